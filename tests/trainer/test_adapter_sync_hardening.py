"""The adapter-sync sidecar against hostile callers, over real HTTP with real S3: the key is
required, the manifest digest is required, and a folder is never answered "cached" (or
replaced) unless it was synced from that very digest."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from http.server import ThreadingHTTPServer

import pytest

from adapterfactory import published
from kubetune_trainer.adaptersync import Syncer, SyncError, make_handler
from kubetune_trainer.diskbudget import folder_bytes
from kubetune.storage import Storage

pytestmark = [pytest.mark.cluster, pytest.mark.trainer]
KEY = "sync-key"


@pytest.fixture
def sidecar(tmp_path, s3_env):
    root = tmp_path / "adapters"
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(Syncer(root), KEY))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}", root
    httpd.shutdown()
    httpd.server_close()


def post(url: str, body: dict, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + "/v1/sync", data=json.dumps(body).encode(),
                                 headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_sync_needs_the_key_the_digest_and_a_folder_inside(sidecar, s3_env, tmp_path):
    url, root = sidecar
    storage = Storage()
    uri, digest = published(storage, s3_env.bucket, tmp_path, "LoRA")
    body = {"uri": uri, "sha256": digest, "path": str(root / "a-1")}
    assert post(url, body, key=None)[0] == 401
    assert post(url, body, key="nope")[0] == 401
    status, err = post(url, {**body, "sha256": None})
    assert status == 400 and "sha256" in err["message"]
    for outside in ("/etc/evil", str(root / ".." / "evil"), str(root / "a" / "b"), str(root)):
        status, err = post(url, {**body, "path": outside})
        assert status == 400, outside
    assert not (root.parent / "evil").exists()
    status, out = post(url, body)
    assert status == 200 and out["files"] >= 2, out
    assert post(url, body)[1].get("cached") is True


def test_a_folder_is_never_cached_or_replaced_for_another_digest(sidecar, s3_env, tmp_path):
    url, root = sidecar
    storage = Storage()
    uri_a, digest_a = published(storage, s3_env.bucket, tmp_path, "LoRA", seed=1)
    uri_b, digest_b = published(storage, s3_env.bucket, tmp_path, "LoRA", seed=2)
    assert post(url, {"uri": uri_a, "sha256": digest_a, "path": str(root / "x")})[0] == 200
    before = (root / "x" / "adapter_model.safetensors").read_bytes()
    status, err = post(url, {"uri": uri_b, "sha256": digest_b, "path": str(root / "x")})
    assert status == 400 and "another artifact" in err["message"]
    assert (root / "x" / "adapter_model.safetensors").read_bytes() == before
    # a folder planted by someone else (no record of a sync) is not "cached" either
    planted = root / "planted"
    planted.mkdir()
    (planted / "adapter_config.json").write_text("{}")
    status, err = post(url, {"uri": uri_a, "sha256": digest_a, "path": str(planted)})
    assert status == 400 and "another artifact" in err["message"]


def _bytes(storage: Storage, uri: str) -> int:
    manifest = json.loads(storage.get_bytes(uri + "/manifest.json", limit=1 << 20))
    return sum(info["size"] for info in manifest["files"].values())


def test_the_folder_limit_evicts_the_least_recently_synced_and_refuses_what_cannot_fit(
        s3_env, tmp_path):
    storage = Storage()
    arts = [published(storage, s3_env.bucket, tmp_path, "LoRA", seed=i) for i in range(3)]
    size = _bytes(storage, arts[0][0])
    assert all(_bytes(storage, uri) == size for uri, _ in arts)
    root = tmp_path / "adapters"
    root.mkdir()
    (root / ".partial-crashed").mkdir()  # a download a crash left behind
    (root / ".partial-crashed" / "w").write_bytes(b"x" * 1000)
    marker = 200  # the sync record beside each folder's files
    syncer = Syncer(root, max_total_bytes=2 * (size + marker))
    assert not (root / ".partial-crashed").exists() and syncer.budget.used == 0

    def sync(i: int, name: str) -> dict:
        return syncer.sync(arts[i][0], arts[i][1], str(root / name))
    sync(0, "a")
    sync(1, "b")
    assert sync(0, "a")["cached"]  # a cache hit makes "a" the most recently used
    sync(2, "c")  # no room for three: "b", the least recently synced, goes
    assert sorted(p.name for p in root.iterdir()) == ["a", "c"]
    assert syncer.budget.used == folder_bytes(root) <= syncer.budget.cap  # what is on disk

    small = Syncer(tmp_path / "small", max_total_bytes=size - 1)
    with pytest.raises(SyncError) as err:
        small.sync(arts[0][0], arts[0][1], str(small.root / "a"))
    assert err.value.status == 507 and "limit" in str(err.value)
    assert list(small.root.iterdir()) == [] and small.budget.used == 0  # nothing written


def test_a_sync_that_cannot_fit_is_answered_507_over_http(s3_env, tmp_path):
    storage = Storage()
    uri, digest = published(storage, s3_env.bucket, tmp_path, "LoRA")
    root = tmp_path / "tiny"
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(
        Syncer(root, max_total_bytes=1024), KEY))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        status, err = post(f"http://127.0.0.1:{httpd.server_port}",
                           {"uri": uri, "sha256": digest, "path": str(root / "a")})
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert status == 507 and err["type"] == "InsufficientStorageError", err
    assert "1024-byte limit" in err["message"] and list(root.iterdir()) == []
