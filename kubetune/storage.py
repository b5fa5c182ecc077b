"""Object storage behind URIs: ``s3://bucket/key`` (boto3) and ``file:///path``.

Uploads are multipart with retries; downloads resume from a ``.part`` file and are cached by
ETag. Every failure becomes a :class:`StorageError` whose message names the URI and the cause.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from . import safepath

MULTIPART_CHUNK = 8 * 1024 * 1024
SHARED_CLIENTS = 64  # distinct (endpoint, region, keys, limits) kept by `shared`
_shared: dict[tuple, "Storage"] = {}
_shared_lock = threading.Lock()


def shared(endpoint: str | None = None, region: str | None = None, retries: int = 5,
           access_key: str | None = None, secret_key: str | None = None,
           deadline: float | None = None) -> "Storage":
    """One Storage (and one boto3 client, which is thread-safe) per distinct configuration,
    for long-running processes (operator, serve, sidecar): creating a boto3 session and client
    costs ~190 ms of CPU and several MiB, which a reconcile or a load paid every time. Keys are
    part of the identity, so a rotated Secret gets a new client; at most SHARED_CLIENTS are
    kept (the oldest is dropped)."""
    key = (endpoint, region, retries, access_key, secret_key, deadline)
    with _shared_lock:
        found = _shared.get(key)
        if found is None:
            found = Storage(endpoint, region, retries=retries, access_key=access_key,
                            secret_key=secret_key, deadline=deadline)
            if len(_shared) >= SHARED_CLIENTS:
                _shared.pop(next(iter(_shared)))
            _shared[key] = found
        return found


class StorageError(RuntimeError):
    """A storage operation failed; the message is one line naming the URI and cause."""


@dataclass(frozen=True)
class Location:
    scheme: str
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> "Location":
        parsed = urlparse(uri)
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise StorageError(f"{uri}: an s3:// URI needs a bucket")
            return cls("s3", parsed.netloc, parsed.path.lstrip("/"))
        if parsed.scheme == "file":
            return cls("file", "", parsed.path)
        raise StorageError(f"{uri}: unsupported scheme (use s3:// or file://)")

    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.scheme == "s3" else f"file://{self.key}"


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


class Storage:
    def __init__(self, endpoint: str | None = None, region: str | None = None,
                 retries: int = 5, access_key: str | None = None, secret_key: str | None = None,
                 deadline: float | None = None, min_rate: float = 1024 * 1024):
        """`deadline`: with it, a streamed read (get_bytes, sha256) must finish within
        `deadline` + size / `min_rate` seconds or fail; the operator sets it, so an endpoint
        that drips bytes cannot hold a reconcile."""
        self.access_key, self.secret_key = access_key, secret_key
        self.deadline, self.min_rate = deadline, min_rate
        self.endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or \
            os.environ.get("AWS_ENDPOINT_URL")
        self.region = region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.retries = retries
        self._client = None

    # ---- s3 plumbing ----------------------------------------------------------------------
    @property
    def s3(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            # A session of our own: boto3's default session caches credentials process-wide.
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint, region_name=self.region,
                aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                config=Config(retries={"max_attempts": self.retries, "mode": "standard"},
                              connect_timeout=5, read_timeout=60,
                              max_pool_connections=32,  # shared by a process's workers
                              s3={"addressing_style": "path"}))
        return self._client

    def _transfer(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=MULTIPART_CHUNK,
                              multipart_chunksize=MULTIPART_CHUNK, max_concurrency=4)

    def _error(self, uri: str, exc: Exception) -> StorageError:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                return StorageError(f"{uri}: S3 access denied ({code}); check the credentials "
                                    f"Secret and the bucket policy")
            if code in ("NoSuchKey", "404", "NoSuchBucket"):
                return StorageError(f"{uri}: not found ({code})")
            return StorageError(f"{uri}: S3 error {code}: "
                                f"{exc.response.get('Error', {}).get('Message', '')}")
        if isinstance(exc, BotoCoreError):
            return StorageError(f"{uri}: S3 unreachable ({exc})")
        text = str(exc)
        for code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            if code in text:  # boto3's S3UploadFailedError wraps the ClientError as text
                return StorageError(f"{uri}: S3 access denied ({code}); check the credentials "
                                    f"Secret and the bucket policy")
        if "Could not connect" in text or "Connection" in text:
            return StorageError(f"{uri}: S3 unreachable ({text[:200]})")
        if isinstance(exc, FileNotFoundError):
            return StorageError(f"{uri}: not found")
        return StorageError(f"{uri}: {exc}")

    @contextmanager
    def _mapped(self, uri: str):
        """Every failure inside becomes one StorageError naming `uri` and the cause."""
        try:
            yield
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to one clear line
            raise self._error(uri, exc) from exc

    @staticmethod
    def _write_local(dest: Path, write) -> None:
        """Write through a `.tmp` sibling and rename: readers never see half a file."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        write(tmp)
        tmp.replace(dest)

    # ---- operations -----------------------------------------------------------------------
    def put_file(self, local: Path, uri: str) -> None:
        loc = Location.parse(uri)
        with self._mapped(uri):
            if loc.scheme == "file":
                self._write_local(Path(loc.key), lambda tmp: shutil.copyfile(local, tmp))
            else:
                self.s3.upload_file(str(local), loc.bucket, loc.key, Config=self._transfer())

    def put_bytes(self, data: bytes, uri: str) -> None:
        loc = Location.parse(uri)
        with self._mapped(uri):
            if loc.scheme == "file":
                self._write_local(Path(loc.key), lambda tmp: tmp.write_bytes(data))
            else:
                self.s3.put_object(Bucket=loc.bucket, Key=loc.key, Body=data)

    def get_bytes(self, uri: str, limit: int | None = None) -> bytes:
        """The object's bytes; with `limit`, a larger object is refused without reading it all."""
        loc = Location.parse(uri)
        with self._mapped(uri):
            if loc.scheme == "file":
                with open(loc.key, "rb") as handle:
                    data = handle.read() if limit is None else handle.read(limit + 1)
            else:
                def read() -> bytes:
                    body = self.s3.get_object(Bucket=loc.bucket, Key=loc.key)["Body"]
                    try:
                        return body.read() if limit is None else body.read(limit + 1)
                    finally:
                        body.close()
                data = self._bounded(uri, read, limit or 0)
        if limit is not None and len(data) > limit:
            raise StorageError(f"{uri}: larger than the {limit}-byte limit")
        return data

    def sha256(self, uri: str, size: int) -> str:
        """The sha256 of an object of exactly `size` bytes, streamed (nothing is stored); an
        object of another size is refused, reading at most `size` + 1 bytes."""
        loc = Location.parse(uri)

        def stream() -> tuple[str, int]:
            digest, seen = hashlib.sha256(), 0
            handle = open(loc.key, "rb") if loc.scheme == "file" else \
                self.s3.get_object(Bucket=loc.bucket, Key=loc.key)["Body"]
            try:
                while seen <= size:
                    chunk = handle.read(min(1024 * 1024, size + 1 - seen))
                    if not chunk:
                        break
                    seen += len(chunk)
                    digest.update(chunk)
            finally:
                handle.close()
            return digest.hexdigest(), seen

        with self._mapped(uri):
            hexdigest, seen = stream() if loc.scheme == "file" else \
                self._bounded(uri, stream, size)
        if seen != size:
            raise StorageError(f"{uri}: {'more' if seen > size else seen} bytes, "
                               f"expected {size}")
        return hexdigest

    def _bounded(self, uri: str, work, size: int):
        """`work()`, or StorageError once `deadline` + size / min_rate seconds have passed. The
        work runs in a daemon thread: a read stuck on a dripping endpoint is abandoned, never
        waited on (the thread ends when that endpoint stops sending)."""
        if self.deadline is None:
            return work()
        seconds = self.deadline + size / self.min_rate
        box: dict = {}

        def run() -> None:
            try:
                box["value"] = work()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                box["error"] = exc

        thread = threading.Thread(target=run, daemon=True, name="kubetune-s3-read")
        thread.start()
        thread.join(seconds)
        if thread.is_alive():
            raise StorageError(f"{uri}: no complete answer within {seconds:.0f} s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def exists(self, uri: str) -> bool:
        loc = Location.parse(uri)
        if loc.scheme == "file":
            return Path(loc.key).exists()
        try:
            self.s3.head_object(Bucket=loc.bucket, Key=loc.key)
            return True
        except Exception as exc:  # noqa: BLE001
            err = self._error(uri, exc)
            if "not found" in str(err):
                return False
            raise err from exc

    def list(self, prefix_uri: str) -> list[tuple[str, int]]:
        """(uri, size) of every object under a prefix, sorted by uri."""
        loc = Location.parse(prefix_uri)
        out: list[tuple[str, int]] = []
        with self._mapped(prefix_uri):
            if loc.scheme == "file":
                root = Path(loc.key)
                if root.is_dir():
                    out = [(f"file://{p}", p.stat().st_size) for p in root.rglob("*")
                           if p.is_file() and not p.name.endswith(".tmp")]
            else:
                prefix = loc.key.rstrip("/") + "/" if loc.key else ""
                paginator = self.s3.get_paginator("list_objects_v2")
                for page in paginator.paginate(Bucket=loc.bucket, Prefix=prefix):
                    for obj in page.get("Contents", []):
                        out.append((f"s3://{loc.bucket}/{obj['Key']}", obj["Size"]))
        return sorted(out)

    def delete_prefix(self, prefix_uri: str) -> None:
        loc = Location.parse(prefix_uri)
        with self._mapped(prefix_uri):
            if loc.scheme == "file":
                shutil.rmtree(loc.key, ignore_errors=True)
                return
            keys = [Location.parse(u).key for u, _ in self.list(prefix_uri)]
            for i in range(0, len(keys), 1000):
                self.s3.delete_objects(Bucket=loc.bucket, Delete={
                    "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})

    def get_file(self, uri: str, dest: Path, size: int | None = None) -> Path:
        """Download one object to `dest`, resuming a partial `.part` download. With `size`, an
        object of any other size is refused before its bytes are fetched."""
        loc = Location.parse(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._mapped(uri):
            if loc.scheme == "file":
                if size is not None and Path(loc.key).stat().st_size != size:
                    raise StorageError(f"{uri}: {Path(loc.key).stat().st_size} bytes, "
                                       f"expected {size}")
                shutil.copyfile(loc.key, dest)
                return dest
            head = self.s3.head_object(Bucket=loc.bucket, Key=loc.key)
            total = head["ContentLength"]
            if size is not None and total != size:
                raise StorageError(f"{uri}: {total} bytes, expected {size}")
            part = dest.with_name(dest.name + ".part")
            have = part.stat().st_size if part.exists() else 0
            if have > total:
                part.unlink()
                have = 0
            if have < total:
                resp = self.s3.get_object(Bucket=loc.bucket, Key=loc.key,
                                          Range=f"bytes={have}-", IfMatch=head["ETag"])
                with open(part, "ab") as out:
                    for chunk in iter(lambda: resp["Body"].read(1024 * 1024), b""):
                        out.write(chunk)
                        have += len(chunk)
                        if have > total:  # the object changed under us: never store more
                            break
            if part.stat().st_size != total:
                got = part.stat().st_size
                part.unlink()
                raise StorageError(f"{uri}: {'short' if got < total else 'oversized'} download "
                                   f"({got} of {total} bytes)")
            part.replace(dest)
            return dest

    def download_prefix(self, prefix_uri: str, dest: Path) -> Path:
        """Mirror every object under a prefix into `dest` (relative paths kept)."""
        loc = Location.parse(prefix_uri)
        if loc.scheme == "file":
            src = Path(loc.key)
            if not src.exists():
                raise StorageError(f"{prefix_uri}: not found")
            return src  # a mounted volume is used in place
        base = loc.key.rstrip("/") + "/"
        objects = self.list(prefix_uri)
        if not objects:
            raise StorageError(f"{prefix_uri}: no objects under this prefix")
        for uri, size in objects:
            rel = Location.parse(uri).key[len(base):]
            try:
                local = safepath.join(dest, rel)
            except safepath.UnsafePath as exc:
                raise StorageError(f"{uri}: refused: {exc}") from None
            self.get_file(uri, local, size)
        return dest

    def cached(self, uri: str, cache_dir: Path) -> Path:
        """A local copy of a file or prefix, kept in `cache_dir` and reused while unchanged."""
        loc = Location.parse(uri)
        if loc.scheme == "file":
            path = Path(loc.key)
            if not path.exists():
                raise StorageError(f"{uri}: not found")
            return path
        slot = cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:16]
        stamp = slot / ".kubetune-cache.json"
        try:
            head = self.s3.head_object(Bucket=loc.bucket, Key=loc.key) if loc.key else None
        except Exception as exc:  # noqa: BLE001
            err = self._error(uri, exc)
            if "not found" not in str(err):
                raise err from exc
            head = None
        if head is not None:  # a single object
            try:
                target = safepath.join(slot, Path(loc.key).name)
            except safepath.UnsafePath as exc:
                raise StorageError(f"{uri}: refused: {exc}") from None
            if stamp.exists() and json.loads(stamp.read_text()).get("etag") == head["ETag"] \
                    and target.exists():
                return target
            self.get_file(uri, target)
            stamp.write_text(json.dumps({"uri": uri, "etag": head["ETag"]}))
            return target
        listing = self.list(uri)
        if not listing:
            raise StorageError(f"{uri}: not found")
        signature = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
        target = slot / "tree"
        if stamp.exists() and json.loads(stamp.read_text()).get("etag") == signature:
            return target
        self.download_prefix(uri, target)
        stamp.write_text(json.dumps({"uri": uri, "etag": signature}))
        return target
