"""`python -m kubetune_trainer adapter-sync`: the sidecar beside a vLLM server. vLLM loads
adapters only from its own filesystem; the operator asks this sidecar to put a verified copy of
an S3 artifact into the volume both containers share, then tells vLLM to load that folder.

    POST /v1/sync {"uri": "s3://…", "sha256": "<manifest digest>", "path": "/adapters/x-abc"}
      200 {"path": …, "files": N}          (already synced from that digest: 200 at once)
      400 {"object": "error", …}           (path outside the folder, digest mismatch, …)
      401                                  (a key is configured and the request lacks it)
    GET /health

`sha256` is required: a folder is synced from one pinned manifest and records that digest, so
an existing folder answers "cached" only for the same digest (another is refused, never
overwritten). With `--api-key` (or $KUBETUNE_API_KEY) /v1/sync needs `Authorization: Bearer`.

Downloads go to a temporary folder and are renamed into place only after every file digest
matched the manifest, so vLLM never sees a half-written adapter. Credentials come from the
environment (a Secret), never from the request.

The folder has a total limit (`--max-bytes`, $KUBETUNE_SYNC_MAX_BYTES): room for a new
artifact is made from its manifest's sizes before a byte is fetched, by removing the least
recently synced folders (a folder's files are needed only while vLLM loads them, and the
operator syncs again before every load); one that cannot fit is answered 507, nothing
written. Partial downloads left by a crash are removed at start."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class SyncError(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


MARKER = ".kubetune-sync.json"
MAX_ADAPTER_BYTES = 8 * 1024 ** 3
MAX_TOTAL_BYTES = 32 * 1024 ** 3
_HEX64 = re.compile(r"[0-9a-f]{64}")


class Syncer:
    def __init__(self, root: Path, max_bytes: int = MAX_ADAPTER_BYTES,
                 max_total_bytes: int = MAX_TOTAL_BYTES):
        from .diskbudget import DiskBudget, folder_bytes

        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        # Recency of use, newest highest: a counter, since file times can tie. Folders synced
        # before a restart rank by their record's mtime, below anything used since.
        self._seq = 0
        self._recency: dict[str, int] = {}
        for _, folder in sorted(self._synced()):
            self._touch(folder)
        self.budget = DiskBudget(max_total_bytes, folder_bytes(self.root), self._evict,
                                 what=f"{self.root}")

    def _synced(self) -> list[tuple[float, Path]]:
        """(record mtime, folder) of every folder this sidecar synced (it holds the record)."""
        found = []
        for folder in self.root.iterdir():
            marker = folder / MARKER
            try:
                if folder.is_dir() and not folder.is_symlink() and marker.is_file():
                    found.append((marker.stat().st_mtime, folder))
            except OSError:
                continue
        return found

    def _touch(self, folder: Path) -> None:
        with self.lock:
            self._seq += 1
            self._recency[folder.name] = self._seq
        try:
            os.utime(folder / MARKER)  # the order survives a restart
        except OSError:
            pass

    def _evict(self, needed: int) -> int:
        """Remove the least recently used synced folders until `needed` bytes are free; the
        bytes freed. Only folders this sidecar synced are touched."""
        from .diskbudget import folder_bytes

        freed = 0
        for _, folder in sorted(self._synced(),
                                key=lambda f: (self._recency.get(f[1].name, 0), f[0])):
            if freed >= needed:
                break
            size = folder_bytes(folder)
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                freed += size
                self._recency.pop(folder.name, None)
        return freed

    def _synced_from(self, dest: Path) -> str | None:
        try:
            return json.loads((dest / MARKER).read_text()).get("sha256")
        except (OSError, ValueError, AttributeError):
            return None

    def sync(self, uri: str, sha256: str, path: str) -> dict:
        from kubetune import safepath
        from kubetune.artifacts import VerificationError, verify
        from kubetune.storage import StorageError, shared

        if not isinstance(uri, str) or not uri.startswith("s3://"):
            raise SyncError("'uri' must be an s3:// URI")
        if not isinstance(sha256, str) or not _HEX64.fullmatch(sha256):
            raise SyncError("'sha256' (the manifest's digest, 64 hex digits) is required")
        if not isinstance(path, str) or Path(path).parent.resolve() != self.root:
            raise SyncError(f"path {str(path)[:200]} must be a folder directly under "
                            f"{self.root}")
        try:
            dest = safepath.join(self.root, Path(path).name)
        except safepath.UnsafePath as exc:
            raise SyncError(str(exc)) from None
        if dest.exists():
            if self._synced_from(dest) == sha256:
                self._touch(dest)  # recently used: evicted last
                return {"path": str(dest), "cached": True}
            raise SyncError(f"{dest} already holds another artifact (not synced from "
                            f"manifest {sha256}); refusing to replace it")
        from .diskbudget import BudgetExceeded, folder_bytes

        scratch = self.root / f".partial-{uuid.uuid4().hex}"
        held = [0]

        def reserve(total: int) -> None:
            self.budget.reserve(total)
            held[0] = total
        kept = False
        try:
            manifest, _ = verify(uri, shared(), scratch, expected_sha256=sha256,
                                 max_bytes=self.max_bytes, reserve=reserve)
            (scratch / MARKER).write_text(json.dumps({"uri": uri, "sha256": sha256}))
            with self.lock:
                if dest.exists():
                    if self._synced_from(dest) != sha256:
                        raise SyncError(f"{dest} was written by another sync meanwhile")
                else:
                    os.rename(scratch, dest)
                    kept = True
                    self.budget.settle(held[0], folder_bytes(dest))  # with its sync record
            if kept:
                self._touch(dest)
        except BudgetExceeded as exc:
            raise SyncError(f"{uri}: {exc}", 507) from None
        except (VerificationError, StorageError) as exc:
            raise SyncError(str(exc)) from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            if not kept:
                self.budget.release(held[0])
        return {"path": str(dest), "files": len(manifest["files"])}


def make_handler(syncer: Syncer, api_key: str | None = None):
    from .serve import ServeError, authorized, read_body

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 60.0

        def log_message(self, *args):
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            self._send(200 if self.path == "/health" else 404, {})

        def do_POST(self):  # noqa: N802
            if not authorized(self.headers, api_key):
                self.close_connection = True
                self._send(401, {"object": "error", "message": "Unauthorized", "code": 401,
                                 "type": "AuthenticationError"})
                return
            if self.path != "/v1/sync":
                self._send(404, {"object": "error", "message": "no such route"})
                return
            try:
                body = json.loads(read_body(self, 64 * 1024) or b"{}")
                if not isinstance(body, dict):
                    raise SyncError("the body must be a JSON object")
                self._send(200, syncer.sync(body.get("uri"), body.get("sha256"),
                                            body.get("path")))
            except ServeError as exc:
                self._send(exc.status, exc.body())
            except SyncError as exc:
                self._send(exc.status, {"object": "error", "message": str(exc),
                                        "code": exc.status,
                                        "type": "InsufficientStorageError" if exc.status == 507
                                        else "BadRequestError"})
            except ValueError as exc:
                self._send(400, {"object": "error", "message": str(exc), "code": 400,
                                 "type": "BadRequestError"})

    return Handler


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="kubetune-trainer adapter-sync")
    parser.add_argument("--dir", type=Path, default=Path("/adapters"))
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--api-key", default=os.environ.get("KUBETUNE_API_KEY"),
                        help="require 'Authorization: Bearer <key>' on /v1/sync "
                             "(default $KUBETUNE_API_KEY)")
    parser.add_argument("--max-bytes", type=int,
                        default=int(os.environ.get("KUBETUNE_SYNC_MAX_BYTES", MAX_TOTAL_BYTES)),
                        help="limit of the whole folder; least recently synced adapters are "
                             "removed to make room (default $KUBETUNE_SYNC_MAX_BYTES, 32 GiB)")
    args = parser.parse_args(argv)
    httpd = ThreadingHTTPServer((args.host, args.port),
                                make_handler(Syncer(args.dir, max_total_bytes=args.max_bytes),
                                             args.api_key))
    httpd.daemon_threads = True
    print(json.dumps({"event": "adapter-sync", "dir": str(args.dir), "port": args.port}),
          flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0
