"""Hostile artifacts: names from a manifest or a listing never leave their folder, manifests are
size-capped and shape-checked, limits hold before a byte is downloaded, and the operator's
verifier writes nothing to disk.

Storage here is the real `file://` back end on the real file system. SeaweedFS refuses object
keys with `.` or `..` parts (checked), but AWS S3 and others accept them, so a listing that
names `../x` is what a hostile bucket sends: `CraftedListing` adds such entries to a real
listing — a faithful stand-in for that bucket, not for S3 itself."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pytest

from kubetune import artifacts, safepath
from kubetune.artifacts import VerificationError
from kubetune_trainer.checkpoints import Checkpoints
from kubetune.storage import Storage, StorageError

pytestmark = pytest.mark.unit

BAD_NAMES = ["", "/etc/passwd", "../escape", "a/../../escape", "a//b", "./a", "a/.", "a\\..\\b",
             "a\x00b", "x" * 300, "a/" * 600 + "b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_name_that_is_not_a_plain_relative_path_is_refused(name, tmp_path):
    with pytest.raises(safepath.UnsafePath):
        safepath.join(tmp_path, name)


def test_plain_names_join_and_a_symlink_out_of_the_folder_is_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    assert safepath.join(root, "sub/adapter_model.safetensors") == \
        root / "sub" / "adapter_model.safetensors"
    (root / "link").symlink_to(outside)
    with pytest.raises(safepath.UnsafePath, match="resolves outside"):
        safepath.join(root, "link/x")


class CraftedListing(Storage):
    """The real file:// storage, whose listing also names `extra` (relative name → size)."""

    def __init__(self, extra: dict[str, int]):
        super().__init__()
        self.extra = extra
        self.fetched: list[str] = []

    def list(self, prefix_uri: str):
        return sorted(super().list(prefix_uri) + [(prefix_uri.rstrip("/") + "/" + rel, size)
                                                  for rel, size in self.extra.items()])

    def get_file(self, uri, dest, size=None):
        self.fetched.append(uri)
        return super().get_file(uri, dest, size)


def artifact(tmp_path: Path, files: dict[str, bytes], manifest: dict | None = None,
             raw_manifest: bytes | None = None) -> str:
    folder = tmp_path / "bucket" / "adapter"
    folder.mkdir(parents=True)
    entries = {}
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
        entries[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    body = raw_manifest if raw_manifest is not None else json.dumps(
        manifest if manifest is not None else {"formatVersion": 1, "files": entries}).encode()
    (folder / artifacts.MANIFEST).write_bytes(body)
    return f"file://{folder}"


def test_a_manifest_naming_a_file_outside_writes_nothing_outside(tmp_path):
    """The listing (a hostile bucket's) and the manifest both name `../escape`: refused before
    any download, nothing written next to the destination."""
    data = b"payload"
    uri = artifact(tmp_path, {"adapter_config.json": b"{}"}, manifest={
        "formatVersion": 1, "files": {
            "adapter_config.json": {"sha256": hashlib.sha256(b"{}").hexdigest(), "size": 2},
            "../escape": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}}})
    storage = CraftedListing({"../escape": len(data)})
    dest = tmp_path / "dest" / "adapter"
    with pytest.raises(VerificationError) as err:
        artifacts.verify(uri, storage, dest)
    assert err.value.reason == "UnsafePath" and "../escape" in str(err.value)
    assert storage.fetched == [] and not (tmp_path / "dest" / "escape").exists()


@pytest.mark.parametrize("name", ["/tmp/absolute", "a/../../b", "a//b"])
def test_every_unsafe_manifest_name_is_refused_by_its_reason(name, tmp_path):
    uri = artifact(tmp_path, {}, manifest={"formatVersion": 1, "files": {
        name: {"sha256": "0" * 64, "size": 1}}})
    with pytest.raises(VerificationError) as err:
        artifacts.verify(uri, CraftedListing({name: 1}), tmp_path / "dest")
    assert err.value.reason == "UnsafePath"
    assert not (tmp_path / "dest").exists()


def test_a_symlink_in_the_destination_is_not_followed(tmp_path):
    uri = artifact(tmp_path, {"sub/file.bin": b"abc"})
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / "sub").symlink_to(outside)
    with pytest.raises(VerificationError, match="resolves outside"):
        artifacts.verify(uri, Storage(), dest)
    assert list(outside.iterdir()) == []


def test_prefix_downloads_and_checkpoints_refuse_crafted_listing_names(tmp_path):
    """`download_prefix` (s3:// sources) and `Checkpoints.latest` (resumption) join listing
    names too: a crafted name is refused, nothing is written outside."""
    storage = CraftedListing({"../../escape": 3})

    def s3_listing(prefix_uri):
        return [(prefix_uri.rstrip("/") + "/../../escape", 3)]

    storage.list = s3_listing
    dest = tmp_path / "dest"
    with pytest.raises(StorageError, match="refused"):
        storage.download_prefix("s3://bucket/models/m", dest)
    assert storage.fetched == [] and not (tmp_path / "escape").exists()

    class Cfg:
        class output:
            checkpoints_uri = "s3://bucket/run/checkpoints"

    checkpoints = Checkpoints(Cfg, storage, reporter=None)
    checkpoints.complete_steps = lambda: [10]
    with pytest.raises(StorageError, match="refused"):
        checkpoints.latest(tmp_path / "work")
    assert storage.fetched == [] and not any(tmp_path.glob("escape"))


@pytest.mark.parametrize("raw,reason", [
    (b"not json", "ManifestInvalid"),
    (b"[1, 2]", "ManifestInvalid"),
    (json.dumps({"formatVersion": 1, "files": []}).encode(), "ManifestInvalid"),
    (json.dumps({"formatVersion": 1, "files": {"a": {"sha256": "zz", "size": 1}}}).encode(),
     "ManifestInvalid"),
    (json.dumps({"formatVersion": 1, "files": {"a": {"sha256": "0" * 64, "size": -1}}}).encode(),
     "ManifestInvalid"),
    (json.dumps({"formatVersion": 1, "files": {"a": {"sha256": "0" * 64, "size": "1"}}}).encode(),
     "ManifestInvalid"),
    (json.dumps({"formatVersion": 1, "files": {
        f"f{i}": {"sha256": "0" * 64, "size": 1} for i in range(artifacts.MAX_FILES + 1)}}
    ).encode(), "ManifestInvalid"),
    (b" " * (artifacts.MAX_MANIFEST_BYTES + 1), "ManifestInvalid"),
])
def test_malformed_manifests_are_refused_with_a_reason(raw, reason, tmp_path):
    uri = artifact(tmp_path, {}, raw_manifest=raw)
    with pytest.raises(VerificationError) as err:
        artifacts.verify(uri, Storage(), tmp_path / "dest")
    assert err.value.reason == reason
    assert not (tmp_path / "dest").exists()


def test_an_artifact_above_the_limit_is_refused_before_any_download(tmp_path):
    uri = artifact(tmp_path, {"a.bin": b"x" * 1000, "b.bin": b"y" * 1000})
    storage = CraftedListing({})
    with pytest.raises(VerificationError) as err:
        artifacts.verify(uri, storage, tmp_path / "dest", max_bytes=1999)
    assert err.value.reason == "ArtifactTooLarge" and storage.fetched == []
    manifest, _ = artifacts.verify(uri, storage, tmp_path / "dest", max_bytes=2000)
    assert sorted(manifest["files"]) == ["a.bin", "b.bin"]


def test_an_object_that_grew_after_listing_is_not_stored(tmp_path):
    """The manifest and listing say 3 bytes; the object now holds more: refused, nothing kept."""
    source = tmp_path / "obj"
    source.write_bytes(b"x" * 100)
    with pytest.raises(StorageError, match="expected 3"):
        Storage().get_file(f"file://{source}", tmp_path / "dest", size=3)
    assert not (tmp_path / "dest").exists()
    with pytest.raises(StorageError, match="expected 3"):
        Storage().sha256(f"file://{source}", 3)


def test_the_operator_verifier_streams_digests_and_writes_nothing(tmp_path, monkeypatch):
    from kubetune_operator.verification import Verifier

    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    monkeypatch.setenv("TMPDIR", str(spool))
    uri = artifact(tmp_path, {"adapter_model.safetensors": os.urandom(4096),
                              "adapter_config.json": b"{}"}, manifest=None)
    result = Verifier(max_bytes=10_000).check(uri, None, Storage())
    assert result.ok, result
    assert list(spool.iterdir()) == []
    # one byte changed, same size: the streamed digest catches it
    target = Path(uri[len("file://"):]) / "adapter_model.safetensors"
    data = bytearray(target.read_bytes())
    data[0] ^= 0xFF
    target.write_bytes(bytes(data))
    bad = Verifier(max_bytes=10_000).check(uri, None, Storage())
    assert not bad.ok and bad.reason == "DigestMismatch"
    small = Verifier(max_bytes=100).check(uri, None, Storage())
    assert not small.ok and small.reason == "ArtifactTooLarge"


def test_manifest_fields_enter_status_typed_and_bounded():
    about = artifacts.described({"method": {"type": "LoRA" * 1000, "rank": "8; rm -rf"},
                                 "baseModel": ["not", "an", "object"], "sizeBytes": 1.5,
                                 "mergedModelUri": {"x": 1}, "metrics": "nope",
                                 "dataset": {"sha256": ["x"]}, "tracking": {"runId": "a\nb"}})
    assert about == {"method": ("LoRA" * 1000)[:2048], "rank": None, "baseModelUri": None,
                     "baseModelRevision": None, "mergedModelUri": None, "sizeBytes": None,
                     "metrics": None, "datasetSha256": None, "trackingRunId": None}


def test_verifying_a_large_artifact_holds_one_chunk_in_memory(tmp_path):
    """64 MiB verified by the operator: Python's peak allocation stays a few MiB (streamed),
    where reading the file whole would need all of it."""
    import tracemalloc

    from kubetune_operator.verification import Verifier

    big = os.urandom(1024 * 1024) * 64
    uri = artifact(tmp_path, {"adapter_model.safetensors": big})
    del big
    tracemalloc.start()
    try:
        result = Verifier(max_bytes=100 * 1024 * 1024).check(uri, None, Storage())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.ok, result
    assert peak < 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"


def test_the_verifier_answers_from_the_manifest_and_streams_the_files_once_meanwhile(
        tmp_path, monkeypatch):
    """begin(): the manifest's verdict at once and the file check in the background (the
    replicas load, pinned to that manifest, meanwhile); concurrent callers share one stream; a
    success is remembered, a failure is not; a verdict the manifest decides needs no stream."""
    import threading

    from kubetune_operator import verification
    from kubetune_operator.verification import Verifier

    gate, streams = threading.Event(), []
    real = verification.verify

    def slow(*args, **kwargs):
        streams.append(args[0])
        assert gate.wait(10)
        return real(*args, **kwargs)
    monkeypatch.setattr(verification, "verify", slow)
    good = artifact(tmp_path / "good", {"adapter_model.safetensors": os.urandom(4096),
                                        "adapter_config.json": b"{}"})
    verifier = Verifier(max_bytes=10_000)
    first, pending = verifier.begin(good, None, Storage())
    second, again = verifier.begin(good, None, Storage())
    assert first.ok and first.digest and pending is not None and again is pending
    assert not pending.done()  # the manifest answered while the files are still read
    gate.set()
    assert pending.result().ok and streams == [good]
    assert verifier.begin(good, None, Storage()) == (pending.result(), None)  # remembered

    bad = artifact(tmp_path / "bad", {"adapter_model.safetensors": os.urandom(4096)})
    target = Path(bad[len("file://"):]) / "adapter_model.safetensors"
    data = bytearray(target.read_bytes())
    data[0] ^= 0xFF
    target.write_bytes(bytes(data))
    provisional, pending = verifier.begin(bad, None, Storage())
    assert provisional.ok and pending.result().reason == "DigestMismatch"
    assert verifier.begin(bad, None, Storage())[1] is not None  # a failure is looked at again
    assert verifier.check(bad, None, Storage()).reason == "DigestMismatch"

    streams.clear()
    too_big, none = Verifier(max_bytes=100).begin(good, None, Storage())
    assert (too_big.ok, too_big.reason, none, streams) == (False, "ArtifactTooLarge", None, [])
    pinned, none = verifier.begin(good, "0" * 64, Storage())
    assert (pinned.reason, none, streams) == ("DigestMismatch", None, [])
