"""`python -m kubetune_trainer adapter-sync`: the sidecar beside a vLLM server. vLLM loads
adapters only from its own filesystem; the operator asks this sidecar to put a verified copy of
an S3 artifact into the volume both containers share, then tells vLLM to load that folder.

    POST /v1/sync {"uri": "s3://…", "sha256": "<manifest digest>", "path": "/adapters/x-abc"}
      200 {"path": …, "files": N}          (already there: 200 at once)
      400 {"object": "error", …}           (path outside the folder, digest mismatch, …)
    GET /health

Downloads go to a temporary folder and are renamed into place only after every file digest
matched the manifest, so vLLM never sees a half-written adapter. Credentials come from the
environment (a Secret), never from the request."""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class SyncError(Exception):
    pass


class Syncer:
    def __init__(self, root: Path):
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()

    def sync(self, uri: str, sha256: str | None, path: str) -> dict:
        from .artifacts import VerificationError, verify
        from .storage import Storage, StorageError

        dest = Path(path).resolve()
        if dest.parent != self.root or not dest.name:
            raise SyncError(f"path {path} must be a folder directly under {self.root}")
        if (dest / "adapter_config.json").exists():
            return {"path": str(dest), "cached": True}
        scratch = self.root / f".partial-{uuid.uuid4().hex}"
        try:
            manifest, _ = verify(uri, Storage(), scratch, expected_sha256=sha256)
            with self.lock:
                if not dest.exists():
                    os.rename(scratch, dest)
        except (VerificationError, StorageError) as exc:
            raise SyncError(str(exc)) from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return {"path": str(dest), "files": len(manifest["files"])}


def make_handler(syncer: Syncer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

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
            if self.path != "/v1/sync":
                self._send(404, {"object": "error", "message": f"no route {self.path}"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                self._send(200, syncer.sync(body["uri"], body.get("sha256"), body["path"]))
            except (SyncError, KeyError, ValueError) as exc:
                self._send(400, {"object": "error", "message": str(exc), "code": 400,
                                 "type": "BadRequestError"})

    return Handler


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="kubetune-trainer adapter-sync")
    parser.add_argument("--dir", type=Path, default=Path("/adapters"))
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args(argv)
    httpd = ThreadingHTTPServer((args.host, args.port), make_handler(Syncer(args.dir)))
    httpd.daemon_threads = True
    print(json.dumps({"event": "adapter-sync", "dir": str(args.dir), "port": args.port}),
          flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0
