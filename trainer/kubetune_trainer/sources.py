"""Turn model and data URIs into local paths: builtin://, s3:// (cached, resumable), file://
(a mounted volume, used in place) and hf:// (real clusters with internet only). A model URI
naming a single ``.gguf`` file (file:// or s3://) is de-quantized once into a cached folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

from . import builtin, ggufconvert
from kubetune.storage import Storage, StorageError


class SourceError(RuntimeError):
    """A model or dataset could not be fetched; one line naming the URI and cause."""


def resolve_model(uri: str, revision: str | None, cache: Path, storage: Storage) -> Path:
    if uri.startswith("builtin://"):
        name = uri.removeprefix("builtin://")
        if revision not in (None, builtin.REVISION):
            raise SourceError(f"{uri}: unknown revision {revision!r} (built-in models have "
                              f"revision {builtin.REVISION})")
        try:
            return builtin.model_path(name, cache)
        except ValueError as exc:
            raise SourceError(str(exc)) from None
    if uri.startswith("hf://"):
        return _huggingface(uri, revision, cache)
    try:
        path = storage.cached(uri, cache / "models")
    except StorageError as exc:
        raise SourceError(f"base model {exc}") from None
    if path.is_file() and path.suffix == ".gguf":
        try:
            return ggufconvert.converted(path, cache)
        except ggufconvert.GGUFError as exc:
            raise SourceError(f"base model {uri}: {exc}") from None
    if not (path / "config.json").exists():
        raise SourceError(f"base model {uri}: no config.json (is this a transformers model "
                          f"folder?)")
    return path


def _huggingface(uri: str, revision: str | None, cache: Path) -> Path:
    repo = uri.removeprefix("hf://")
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo, revision=revision,
                                      cache_dir=str(cache / "hf")))
    except Exception as exc:  # noqa: BLE001 - offline, gated, missing: all one clear line
        raise SourceError(f"base model {uri}: download from the Hugging Face Hub failed "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def resolve_data(uri: str, cache: Path, storage: Storage, sha256: str | None = None) -> Path:
    if uri.startswith("builtin://"):
        try:
            path = builtin.write_dataset(uri.removeprefix("builtin://"), cache / "builtin-data")
        except ValueError as exc:
            raise SourceError(str(exc)) from None
    elif uri.startswith("hf://"):
        raise SourceError(f"dataset {uri}: hf:// datasets are not supported; export to JSONL "
                          f"or Parquet on S3")
    else:
        try:
            path = storage.cached(uri, cache / "data")
        except StorageError as exc:
            raise SourceError(f"dataset {exc}") from None
    if sha256:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.read_bytes())
        if digest.hexdigest() != sha256:
            raise SourceError(f"dataset {uri}: sha256 {digest.hexdigest()} does not match the "
                              f"expected {sha256}")
    return path
