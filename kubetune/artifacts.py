"""Adapter artifacts: the PEFT files plus ``manifest.json``, uploaded with the manifest last.

The manifest (format version 1) records the method and its config, the base model URI and
revision, the dataset digest, trainer and library versions, metrics, and the sha256 and size of
every file. An artifact is trusted only when its manifest verifies; an interrupted upload leaves
no manifest, so it is never trusted, and a retry completes it.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from . import safepath
from .storage import Storage, StorageError, join

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_FILES = 1000
_HEX64 = re.compile(r"[0-9a-f]{64}")


class VerificationError(RuntimeError):
    """An artifact does not match its manifest; `reason` is a CamelCase word for conditions."""

    def __init__(self, message: str, reason: str = "DigestMismatch"):
        super().__init__(message)
        self.reason = reason


PIN = "@sha256:"


def pinned(uri: str, manifest_sha256: str | None) -> str:
    """`uri@sha256:<digest>`: what the operator tells a server to load, so the server loads the
    manifest the operator verified, never one put at that URI since (see split_pin)."""
    return f"{uri}{PIN}{manifest_sha256}" if manifest_sha256 else uri


def split_pin(path: str) -> tuple[str, str | None]:
    """(uri, pinned manifest digest or None) of a path that `pinned` made."""
    uri, sep, digest = path.rpartition(PIN)
    if sep and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        return uri, digest
    return path, None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("kubetune", "torch", "transformers", "peft", "trl", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def build_manifest(directory: Path, *, kind: str, method: dict, base_model: dict,
                   dataset: dict | None, metrics: dict, extra: dict | None = None) -> dict:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = str(path.relative_to(directory))
        if rel == MANIFEST:
            continue
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return {
        "formatVersion": FORMAT_VERSION, "kind": kind, "method": method,
        "baseModel": base_model, "dataset": dataset, "metrics": metrics,
        "versions": versions(), "createdAt": datetime.now(timezone.utc).isoformat(),
        "files": files, "sizeBytes": sum(f["size"] for f in files.values()), **(extra or {}),
    }


def upload(directory: Path, manifest: dict, uri: str, storage: Storage) -> str:
    """Upload every file, then the manifest; returns the manifest's sha256."""
    for rel in manifest["files"]:
        storage.put_file(directory / rel, join(uri, rel))
    body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    storage.put_bytes(body, join(uri, MANIFEST))  # last: its presence means "complete"
    return hashlib.sha256(body).hexdigest()


def parse_manifest(body: bytes, uri: str) -> dict:
    """The manifest, with its shape checked: every file name a plain relative name, every
    digest 64 hex digits, every size a non-negative integer, at most MAX_FILES files."""
    try:
        manifest = json.loads(body)
    except ValueError as exc:
        raise VerificationError(f"{uri}: manifest.json is not JSON ({exc})",
                                "ManifestInvalid") from None
    if not isinstance(manifest, dict):
        raise VerificationError(f"{uri}: manifest.json is not an object", "ManifestInvalid")
    if manifest.get("formatVersion") != FORMAT_VERSION:
        raise VerificationError(f"{uri}: unsupported manifest formatVersion "
                                f"{str(manifest.get('formatVersion'))[:40]}", "ManifestInvalid")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise VerificationError(f"{uri}: manifest.json has no 'files' object",
                                "ManifestInvalid")
    if len(files) > MAX_FILES:
        raise VerificationError(f"{uri}: manifest lists {len(files)} files, more than "
                                f"{MAX_FILES}", "ManifestInvalid")
    for rel, info in files.items():
        try:
            safepath.check_name(rel)
        except safepath.UnsafePath as exc:
            raise VerificationError(f"{uri}: manifest refused: {exc}", "UnsafePath") from None
        if rel == MANIFEST:
            raise VerificationError(f"{uri}: the manifest lists itself", "ManifestInvalid")
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str) \
                or not _HEX64.fullmatch(info["sha256"]) or type(info.get("size")) is not int \
                or info["size"] < 0:
            raise VerificationError(f"{uri}: manifest entry {rel[:200]!r} needs a 64-hex "
                                    f"'sha256' and a non-negative integer 'size'",
                                    "ManifestInvalid")
    return manifest


def verify(uri: str, storage: Storage, dest: Path | None = None,
           expected_sha256: str | None = None, max_bytes: int | None = None,
           remote_digests: bool = False,
           reserve: Callable[[int], None] | None = None) -> tuple[dict, str]:
    """Check an artifact against its manifest; returns (manifest, manifest sha256).

    Sizes are always checked against the listing. With `dest`, every file is downloaded into it
    (names checked so none lands outside) and its digest checked; with `remote_digests`, digests
    are computed from the streamed objects and nothing is stored. `max_bytes` caps the files'
    total, checked before anything is downloaded; `reserve(total)` is called then too (it raises
    to refuse: a disk budget). A failure raises VerificationError or
    StorageError; files already written under `dest` are the caller's to remove."""
    try:
        body = storage.get_bytes(join(uri, MANIFEST), limit=MAX_MANIFEST_BYTES)
    except StorageError as exc:
        if "limit" in str(exc):
            raise VerificationError(f"{uri}: manifest.json is larger than "
                                    f"{MAX_MANIFEST_BYTES} bytes", "ManifestInvalid") from None
        raise VerificationError(f"{uri}: no manifest.json ({exc}); the upload is incomplete "
                                f"or this is not a kubetune artifact", "ManifestMissing") from None
    digest = hashlib.sha256(body).hexdigest()
    if expected_sha256 and digest != expected_sha256:
        raise VerificationError(f"{uri}: manifest sha256 {digest} is not the pinned "
                                f"{expected_sha256}")
    manifest = parse_manifest(body, uri)
    total = sum(info["size"] for info in manifest["files"].values())
    if max_bytes is not None and total > max_bytes:
        raise VerificationError(f"{uri}: the artifact's files hold {total} bytes, more than "
                                f"the {max_bytes}-byte limit", "ArtifactTooLarge")
    listed = {u[len(uri.rstrip('/')) + 1:]: size for u, size in storage.list(uri)}
    for rel, info in manifest["files"].items():
        if rel not in listed:
            raise VerificationError(f"{uri}: {rel} is listed in the manifest but missing",
                                    "ArtifactIncomplete")
        if listed[rel] != info["size"]:
            raise VerificationError(f"{uri}: {rel} is {listed[rel]} bytes, manifest says "
                                    f"{info['size']}")
    if reserve is not None:
        reserve(total)
    for rel, info in manifest["files"].items():
        if dest is not None:
            try:
                target = safepath.join(dest, rel)  # names were checked; this catches symlinks
            except safepath.UnsafePath as exc:
                raise VerificationError(f"{uri}: refused: {exc}", "UnsafePath") from None
            local = storage.get_file(join(uri, rel), target, info["size"])
            actual = sha256_file(local)
        elif remote_digests:
            actual = storage.sha256(join(uri, rel), info["size"])
        else:
            continue
        if actual != info["sha256"]:
            raise VerificationError(f"{uri}: {rel} sha256 {actual} does not match the "
                                    f"manifest's {info['sha256']}")
    return manifest, digest


def described(manifest: dict) -> dict:
    """What a manifest says about its artifact, typed and bounded so it may enter an object's
    status: strings are strings (at most 2048 characters), the rank an integer; anything else
    is left out."""
    def text(value) -> str | None:
        return value[:2048] if isinstance(value, str) else None

    method = manifest.get("method") if isinstance(manifest.get("method"), dict) else {}
    base = manifest.get("baseModel") if isinstance(manifest.get("baseModel"), dict) else {}
    dataset = manifest.get("dataset") if isinstance(manifest.get("dataset"), dict) else {}
    tracking = manifest.get("tracking") if isinstance(manifest.get("tracking"), dict) else {}
    rank, size = method.get("rank"), manifest.get("sizeBytes")
    out = {"method": text(method.get("type")),
           "rank": rank if type(rank) is int else None,
           "baseModelUri": text(base.get("uri")), "baseModelRevision": text(base.get("revision")),
           "mergedModelUri": text(manifest.get("mergedModelUri")),
           "sizeBytes": size if type(size) is int else None,
           "metrics": manifest.get("metrics") if isinstance(manifest.get("metrics"), dict)
           else None,
           # lineage: the training data's digest and the tracking run, pinned by the digest
           "datasetSha256": _matching(dataset.get("sha256"), r"[a-f0-9]{64}"),
           "trackingRunId": _matching(tracking.get("runId"), r"[A-Za-z0-9_\-]{1,64}")}
    return out


def _matching(value, pattern: str) -> str | None:
    import re

    return value if isinstance(value, str) and re.fullmatch(pattern, value) else None
