"""Artifact verification for LoRAAdapters: fetch manifest.json (size-capped), check its shape,
stream every file through sha256 (nothing is written to the operator's disk, memory stays at one
chunk), refuse an artifact larger than the operator's limit before reading it, and remember a
success per (URI, manifest digest) so a resync costs one small GET.

`begin` answers from the manifest alone and streams the files in the background, so the
controller can ask the replicas to load meanwhile: a server is told the manifest's digest
(kubetune serve's pinned path, vLLM's sync sidecar) and checks every file against it itself, so
nothing unverified is served, and the status is written only once the operator's own check
has ended. Each (URI, digest) is streamed by at most one check at a time."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from kubetune.artifacts import (MANIFEST, MAX_MANIFEST_BYTES, VerificationError, described,
                                parse_manifest, verify)
from kubetune.behaviour import Probe
from kubetune.storage import Storage, StorageError, join

from . import metrics
from .reconcile.loraadapter import Verification


class Verifier:
    def __init__(self, max_bytes: int | None = None, workers: int = 4):
        self.max_bytes = max_bytes
        self._cache: dict[tuple[str, str], Verification] = {}
        self._running: dict[tuple[str, str], Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="kubetune-verify")

    def check(self, uri: str, expected: str | None, storage: Storage) -> Verification:
        """The whole check, waited for."""
        v, pending = self.begin(uri, expected, storage)
        return pending.result() if pending is not None else v

    def begin(self, uri: str, expected: str | None, storage: Storage
              ) -> tuple[Verification, Future | None]:
        """(the verdict, None) when it is known without reading the files (cached, or the
        manifest is missing, malformed, over the limit or not the pinned one); else (what the
        manifest says, ok, and the file check running: its Future gives the verdict)."""
        try:
            body = storage.get_bytes(join(uri, MANIFEST), limit=MAX_MANIFEST_BYTES)
        except StorageError as exc:
            text = str(exc)
            if "limit" in text:
                return Verification(False, "ManifestInvalid", text, uri), None
            if "NoSuchKey" in text or "404" in text or "Not Found" in text:
                return Verification(False, "ManifestMissing",
                                    f"{uri}: no manifest.json; the upload is incomplete or this "
                                    f"is not a kubetune artifact", uri), None
            metrics.S3_ERRORS.labels(operation="get").inc()
            return Verification(False, "StorageError", text, uri), None
        digest = hashlib.sha256(body).hexdigest()
        if expected and digest != expected:
            return Verification(False, "DigestMismatch", f"{uri}: manifest sha256 {digest} is "
                                                         f"not the pinned {expected}", uri,
                                digest), None
        with self._lock:
            cached = self._cache.get((uri, digest))
        if cached is not None:
            return cached, None
        try:
            manifest = parse_manifest(body, uri)
        except VerificationError as exc:
            return Verification(False, exc.reason, str(exc), uri, digest), None
        total = sum(info["size"] for info in manifest["files"].values())
        if self.max_bytes is not None and total > self.max_bytes:
            return Verification(False, "ArtifactTooLarge", f"{uri}: the artifact's files hold "
                                f"{total} bytes, more than the {self.max_bytes}-byte limit",
                                uri, digest), None
        with self._lock:
            pending = self._running.get((uri, digest))
            if pending is None:
                pending = self._pool.submit(self._files, uri, digest, storage)
                self._running[(uri, digest)] = pending
        return _verified(uri, digest, manifest), pending

    def _files(self, uri: str, digest: str, storage: Storage) -> Verification:
        try:
            manifest, digest = verify(uri, storage, expected_sha256=digest,
                                      max_bytes=self.max_bytes, remote_digests=True)
            result = _verified(uri, digest, manifest)
        except VerificationError as exc:
            result = Verification(False, exc.reason, str(exc), uri, digest)
        except StorageError as exc:
            metrics.S3_ERRORS.labels(operation="verify").inc()
            result = Verification(False, "StorageError", str(exc), uri, digest)
        except BaseException:
            with self._lock:
                self._running.pop((uri, digest), None)
            raise
        with self._lock:
            if result.ok:  # a failure is not cached: a re-upload under that manifest is seen
                self._cache[(uri, digest)] = result
            self._running.pop((uri, digest), None)
        return result


def _verified(uri: str, digest: str, manifest: dict) -> Verification:
    about = described(manifest)
    return Verification(True, "Verified", "", uri, digest, about["method"], about["rank"],
                        about["baseModelUri"], about["baseModelRevision"],
                        about["mergedModelUri"], Probe.from_manifest(manifest.get("probe")),
                        about["datasetSha256"], about["trackingRunId"])
