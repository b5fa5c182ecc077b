"""Artifact verification for LoRAAdapters: fetch manifest.json (size-capped), check its shape,
stream every file through sha256 (nothing is written to the operator's disk, memory stays at one
chunk), refuse an artifact larger than the operator's limit before reading it, and remember a
success per (URI, manifest digest) so a resync costs one small GET."""

from __future__ import annotations

import hashlib
import threading

from kubetune.artifacts import MANIFEST, MAX_MANIFEST_BYTES, VerificationError, described, verify
from kubetune.behaviour import Probe
from kubetune.storage import Storage, StorageError, join

from . import metrics
from .reconcile.loraadapter import Verification


class Verifier:
    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = max_bytes
        self._cache: dict[tuple[str, str], Verification] = {}
        self._lock = threading.Lock()

    def check(self, uri: str, expected: str | None, storage: Storage) -> Verification:
        try:
            body = storage.get_bytes(join(uri, MANIFEST), limit=MAX_MANIFEST_BYTES)
        except StorageError as exc:
            text = str(exc)
            if "limit" in text:
                return Verification(False, "ManifestInvalid", text, uri)
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
        try:
            manifest, digest = verify(uri, storage, expected_sha256=digest,
                                      max_bytes=self.max_bytes, remote_digests=True)
        except VerificationError as exc:
            # Not cached: a re-upload under the same manifest must be seen.
            return Verification(False, exc.reason, str(exc), uri, digest)
        except StorageError as exc:
            metrics.S3_ERRORS.labels(operation="verify").inc()
            return Verification(False, "StorageError", str(exc), uri, digest)
        about = described(manifest)
        result = Verification(True, "Verified", "", uri, digest, about["method"], about["rank"],
                              about["baseModelUri"], about["baseModelRevision"],
                              about["mergedModelUri"], Probe.from_manifest(manifest.get("probe")))
        with self._lock:
            self._cache[(uri, digest)] = result
        return result

