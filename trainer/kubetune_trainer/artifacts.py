"""Adapter artifacts: the PEFT files plus ``manifest.json``, uploaded with the manifest last.

The manifest (format version 1) records the method and its config, the base model URI and
revision, the dataset digest, trainer and library versions, metrics, and the sha256 and size of
every file. An artifact is trusted only when its manifest verifies; an interrupted upload leaves
no manifest, so it is never trusted, and a retry completes it.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from .storage import Storage, StorageError, join

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class VerificationError(RuntimeError):
    """An artifact does not match its manifest."""


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


def verify(uri: str, storage: Storage, dest: Path | None = None,
           expected_sha256: str | None = None) -> tuple[dict, str]:
    """Download manifest (+ files into `dest` if given) and check every digest."""
    try:
        body = storage.get_bytes(join(uri, MANIFEST))
    except StorageError as exc:
        raise VerificationError(f"{uri}: no manifest.json ({exc}); the upload is incomplete "
                                f"or this is not a kubetune artifact") from None
    digest = hashlib.sha256(body).hexdigest()
    if expected_sha256 and digest != expected_sha256:
        raise VerificationError(f"{uri}: manifest sha256 {digest} is not the pinned "
                                f"{expected_sha256}")
    manifest = json.loads(body)
    if manifest.get("formatVersion") != FORMAT_VERSION:
        raise VerificationError(f"{uri}: unsupported manifest formatVersion "
                                f"{manifest.get('formatVersion')}")
    listed = {u[len(uri.rstrip('/')) + 1:]: size for u, size in storage.list(uri)}
    for rel, info in manifest["files"].items():
        if rel not in listed:
            raise VerificationError(f"{uri}: {rel} is listed in the manifest but missing")
        if listed[rel] != info["size"]:
            raise VerificationError(f"{uri}: {rel} is {listed[rel]} bytes, manifest says "
                                    f"{info['size']}")
        if dest is not None:
            local = storage.get_file(join(uri, rel), dest / rel)
            actual = sha256_file(local)
            if actual != info["sha256"]:
                raise VerificationError(f"{uri}: {rel} sha256 {actual} does not match the "
                                        f"manifest's {info['sha256']}")
    return manifest, digest
