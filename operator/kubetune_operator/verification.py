"""Artifact verification for LoRAAdapters: download manifest.json and every file, check each
digest, remember the result per (URI, manifest digest) so a resync costs one small GET."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import threading
from pathlib import Path

from kubetune_trainer.artifacts import MANIFEST, VerificationError, verify
from kubetune_trainer.storage import Storage, StorageError, join

from . import metrics
from .reconcile.loraadapter import Verification


class Verifier:
    def __init__(self):
        self._cache: dict[tuple[str, str], Verification] = {}
        self._lock = threading.Lock()

    def check(self, uri: str, expected: str | None, storage: Storage) -> Verification:
        try:
            body = storage.get_bytes(join(uri, MANIFEST))
        except StorageError as exc:
            text = str(exc)
            if "NoSuchKey" in text or "404" in text or "Not Found" in text:
                return Verification(False, "ManifestMissing",
                                    f"{uri}: no manifest.json; the upload is incomplete or this "
                                    f"is not a kubetune artifact", uri)
            metrics.S3_ERRORS.labels(operation="get").inc()
            return Verification(False, "StorageError", text, uri)
        digest = hashlib.sha256(body).hexdigest()
        if expected and digest != expected:
            return Verification(False, "DigestMismatch", f"{uri}: manifest sha256 {digest} is "
                                                         f"not the pinned {expected}", uri, digest)
        with self._lock:
            cached = self._cache.get((uri, digest))
        if cached is not None:
            return cached
        scratch = Path(tempfile.mkdtemp(prefix="kubetune-verify-"))
        try:
            manifest, digest = verify(uri, storage, scratch, expected_sha256=digest)
        except VerificationError as exc:
            # Not cached: a re-upload under the same manifest must be seen.
            return Verification(False, "DigestMismatch", str(exc), uri, digest)
        except StorageError as exc:
            metrics.S3_ERRORS.labels(operation="verify").inc()
            return Verification(False, "StorageError", str(exc), uri, digest)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        method = manifest.get("method") or {}
        base = manifest.get("baseModel") or {}
        result = Verification(True, "Verified", "", uri, digest, method.get("type"),
                              method.get("rank"), base.get("uri"), base.get("revision"),
                              manifest.get("mergedModelUri"))
        with self._lock:
            self._cache[(uri, digest)] = result
        return result
