"""`kubetune serve` as a real process: vLLM's runtime LoRA API over every method we train, loads
straight from S3 with manifest verification, no cross-talk under concurrent requests, limits."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import pytest

from adapterfactory import make_adapter, published
from helpers import start_serve
from servingutil import PROMPT, call, complete
from kubetune.storage import Storage

pytestmark = [pytest.mark.cluster, pytest.mark.trainer]
DOWNLOADS: list[Path] = []  # the server's folder of s3:// adapter downloads


def downloads() -> list[Path]:
    return sorted(DOWNLOADS[0].iterdir()) if DOWNLOADS[0].exists() else []


@pytest.fixture(scope="module")
def server(s3_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    DOWNLOADS[:] = [folder / "cache" / "adapters"]
    url, proc = start_serve(folder, "--model", "builtin://tiny-llama", "--revision", "v1",
                            "--served-model-name", "base", "--max-loras=5",
                            "--max-lora-rank=16", env=s3_server.env())
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def storage(s3_server):
    return Storage(s3_server.endpoint, access_key=s3_server.access_key,
                   secret_key=s3_server.secret_key)


def test_every_method_hot_swaps_and_changes_the_output(server, storage, s3_server, tmp_path):
    base_text = complete(server, "base")
    outputs = {}
    for method in ("LoRA", "IA3", "PrefixTuning", "Adapter"):
        uri, _ = published(storage, s3_server.bucket, tmp_path, method, seed=3)
        name = f"ad-{method.lower()}"
        status, text = call(server, "/v1/load_lora_adapter", {"lora_name": name,
                                                              "lora_path": uri})
        assert status == 200 and "added successfully" in text, text
        outputs[name] = complete(server, name)
    assert len(downloads()) == 4  # one verified download per s3:// adapter
    _, models = call(server, "/v1/models")
    ids = [m["id"] for m in models["data"]]
    assert ids[0] == "base" and models["data"][0]["root"] == "builtin://tiny-llama"
    assert set(outputs) <= set(ids)
    for name, text in outputs.items():
        assert text != base_text, f"{name} produced the base model's output {text!r}"
    # The base model is untouched by the adapters beside it.
    assert complete(server, "base") == base_text
    for name in outputs:
        status, text = call(server, "/v1/unload_lora_adapter", {"lora_name": name})
        assert status == 200 and "removed successfully" in text, text
    _, models = call(server, "/v1/models")
    assert [m["id"] for m in models["data"]] == ["base"]
    assert downloads() == []  # an unloaded adapter's download goes with it


def test_concurrent_requests_for_different_adapters_do_not_cross_talk(server, tmp_path):
    # Two LoRAs in one family (shared module tree, switched per request) and a base.
    for seed, name in ((11, "cc-a"), (12, "cc-b")):
        path = make_adapter(tmp_path / name, "LoRA", seed=seed)
        status, text = call(server, "/v1/load_lora_adapter", {"lora_name": name,
                                                              "lora_path": str(path)})
        assert status == 200, text
    prompts = ["What color is the sky?", "Tell me the color of the grass.", PROMPT]
    expected = {(m, p): complete(server, m, p) for m in ("cc-a", "cc-b", "base") for p in prompts}
    assert len({expected[(m, PROMPT)] for m in ("cc-a", "cc-b", "base")}) == 3
    work = [(m, p) for m in ("cc-a", "cc-b", "base") for p in prompts] * 4
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda mp: (mp, complete(server, *mp)), work))
    for key, text in results:
        assert text == expected[key], f"{key}: {text!r} != {expected[key]!r}"
    for name in ("cc-a", "cc-b"):
        call(server, "/v1/unload_lora_adapter", {"lora_name": name})


def test_chat_completions_name_the_adapter(server, tmp_path):
    path = make_adapter(tmp_path / "chat", "LoRA", seed=5)
    assert call(server, "/v1/load_lora_adapter", {"lora_name": "chat",
                                                  "lora_path": str(path)})[0] == 200
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6,
            "temperature": 0}
    status, base = call(server, "/v1/chat/completions", {**body, "model": "base"})
    assert status == 200 and base["object"] == "chat.completion"
    status, tuned = call(server, "/v1/chat/completions", {**body, "model": "chat"})
    assert status == 200 and tuned["model"] == "chat"
    assert tuned["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]
    assert tuned["usage"]["completion_tokens"] > 0
    call(server, "/v1/unload_lora_adapter", {"lora_name": "chat"})


def test_serving_reproduces_the_manifests_probe_through_the_openai_logprobs_api(
        server, tmp_path):
    """The probe the trainer records (loading.probe) is what a replica answers through the
    completions API's `logprobs` (the operator's behaviour check), for every method; the
    chat API's `top_logprobs` agrees; a bad value is a 400."""
    from adapterfactory import probe
    from kubetune.behaviour import Probe, judge, top_entries
    from kubetune_operator.engine import Engine

    host, port = urlparse(server).hostname, urlparse(server).port
    for method in ("LoRA", "IA3", "PrefixTuning", "Adapter"):
        path = make_adapter(tmp_path / f"probe-{method}", method, seed=8)
        name = f"probe-{method.lower()}"
        assert call(server, "/v1/load_lora_adapter", {"lora_name": name,
                                                      "lora_path": str(path)})[0] == 200
        recorded = Probe.from_manifest(probe(path))
        got = Engine(host, port).probe(name, recorded.text, len(recorded.adapter))
        verdict = judge(recorded, got, tolerance=1e-3)  # the same float32 numerics
        assert verdict.ok and verdict.distance < 1e-4, (method, verdict)
        status, chat = call(server, "/v1/chat/completions", {
            "model": name, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 2, "logprobs": True, "top_logprobs": 3})
        assert status == 200, chat
        content = chat["choices"][0]["logprobs"]["content"]
        assert len(content) == chat["usage"]["completion_tokens"]
        assert len(content[0]["top_logprobs"]) == 3 and content[0]["logprob"] <= 0
        assert top_entries(content[0]["top_logprobs"])[0][1] >= content[0]["logprob"] - 1e-6
        call(server, "/v1/unload_lora_adapter", {"lora_name": name})
    status, body = call(server, "/v1/completions", {"model": "base", "prompt": "x",
                                                    "max_tokens": 3, "logprobs": 2})
    lp = body["choices"][0]["logprobs"]
    assert status == 200 and len(lp["tokens"]) == len(lp["token_logprobs"]) == 3
    assert lp["text_offset"][0] == 0 and all(len(t) <= 2 for t in lp["top_logprobs"])
    for bad in (21, -1, "5", 2.5):
        status, err = call(server, "/v1/completions", {"model": "base", "prompt": "x",
                                                       "logprobs": bad})
        assert status == 400 and "logprobs" in err["message"], err
    status, err = call(server, "/v1/completions", {"model": "base", "prompt": "x",
                                                   "logprobs": 1, "stream": True})
    assert status == 400 and "stream" in err["message"]


def test_errors_have_vllms_shape_and_limits_hold(server, storage, s3_server, tmp_path):
    status, err = call(server, "/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404 and err["object"] == "error" and "nope" in err["message"]
    status, err = call(server, "/v1/load_lora_adapter", {"lora_name": "x"})
    assert status == 400 and "lora_path" in err["message"]
    status, err = call(server, "/v1/unload_lora_adapter", {"lora_name": "never-loaded"})
    assert status == 404 and err["type"] == "NotFoundError"
    # rank above --max-lora-rank
    wide = make_adapter(tmp_path / "wide", "LoRA", rank=32)
    status, err = call(server, "/v1/load_lora_adapter", {"lora_name": "wide",
                                                         "lora_path": str(wide)})
    assert status == 400 and "max_lora_rank 16" in err["message"], err
    # a corrupted artifact (one byte changed, same size) is refused and nothing is loaded
    uri, _ = published(storage, s3_server.bucket, tmp_path, "LoRA")
    key = uri.removeprefix(f"s3://{s3_server.bucket}/") + "/adapter_model.safetensors"
    data = bytearray(storage.s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read())
    data[-1] ^= 0xFF
    storage.s3.put_object(Bucket=s3_server.bucket, Key=key, Body=bytes(data))
    before = downloads()
    status, err = call(server, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": uri})
    assert status == 400 and "does not match the manifest" in err["message"], err
    assert downloads() == before  # the refused download left no folder behind
    # a load pinned to the manifest the operator verified: another manifest at that URI (put
    # there since) is refused; the pinned one loads and is listed with its pin
    from kubetune.artifacts import pinned
    good, digest = published(storage, s3_server.bucket, tmp_path, "LoRA", seed=5)
    _, other = published(storage, s3_server.bucket, tmp_path, "LoRA", seed=6)
    status, err = call(server, "/v1/load_lora_adapter", {"lora_name": "pin",
                                                         "lora_path": pinned(good, other)})
    assert status == 400 and "is not the pinned" in err["message"], err
    assert downloads() == before
    status, _ = call(server, "/v1/load_lora_adapter", {"lora_name": "pin",
                                                       "lora_path": pinned(good, digest)})
    assert status == 200
    listed = {m["id"]: m["root"] for m in call(server, "/v1/models")[1]["data"]}
    assert listed["pin"] == f"{good}@sha256:{digest}"
    assert call(server, "/v1/unload_lora_adapter", {"lora_name": "pin"})[0] == 200
    # duplicate names and --max-loras
    path = make_adapter(tmp_path / "dup", "LoRA")
    for i in range(5):
        assert call(server, "/v1/load_lora_adapter", {"lora_name": f"m{i}",
                                                      "lora_path": str(path)})[0] == 200
    status, err = call(server, "/v1/load_lora_adapter", {"lora_name": "m0",
                                                         "lora_path": str(path)})
    assert status == 400 and "already been loaded" in err["message"]
    status, err = call(server, "/v1/load_lora_adapter", {"lora_name": "m5",
                                                         "lora_path": str(path)})
    assert status == 400 and "max_loras=5" in err["message"]
    _, models = call(server, "/v1/models")
    ids = {m["id"] for m in models["data"]}
    assert "bad" not in ids and "wide" not in ids and "m5" not in ids
    for i in range(5):
        call(server, "/v1/unload_lora_adapter", {"lora_name": f"m{i}"})


def test_s3_downloads_are_held_to_the_cache_limit(s3_server, storage, tmp_path):
    """--max-cache-bytes caps the s3:// adapters held on disk: one that would not fit is
    answered 507 before a byte is fetched (no folder, nothing loaded), and an unload frees its
    share."""
    uri_a, _ = published(storage, s3_server.bucket, tmp_path, "LoRA", seed=1)
    uri_b, _ = published(storage, s3_server.bucket, tmp_path, "LoRA", seed=2)
    manifest = json.loads(storage.get_bytes(uri_a + "/manifest.json", limit=1 << 20))
    size = sum(info["size"] for info in manifest["files"].values())
    folder = tmp_path / "capped"
    folder.mkdir()
    url, proc = start_serve(folder, "--model", "builtin://tiny-llama", "--revision", "v1",
                            "--served-model-name", "base", f"--max-cache-bytes={size + size // 2}",
                            env=s3_server.env())
    cache = folder / "cache" / "adapters"
    try:
        assert call(url, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": uri_a})[0] \
            == 200
        held = sorted(cache.iterdir())
        status, err = call(url, "/v1/load_lora_adapter", {"lora_name": "b",
                                                          "lora_path": uri_b})
        assert status == 507 and err["type"] == "InsufficientStorageError", err
        assert "unload an adapter first" in err["message"]
        assert sorted(cache.iterdir()) == held  # nothing fetched for "b"
        assert "b" not in {m["id"] for m in call(url, "/v1/models")[1]["data"]}
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        assert f"kubetune_serve_adapter_cache_bytes {size}" in text
        assert call(url, "/v1/unload_lora_adapter", {"lora_name": "a"})[0] == 200
        assert call(url, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": uri_b})[0] \
            == 200
        assert len(list(cache.iterdir())) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def sse(url: str, path: str, body: dict) -> list:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        for line in resp:
            line = line.decode().strip()
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streaming_sends_the_same_text_piece_by_piece(server, tmp_path):
    for method in ("LoRA", "PrefixTuning"):
        path = make_adapter(tmp_path / f"s-{method}", method, seed=21)
        name = f"stream-{method.lower()}"
        assert call(server, "/v1/load_lora_adapter", {"lora_name": name,
                                                      "lora_path": str(path)})[0] == 200
        body = {"model": name, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
        whole = complete(server, name)
        _, full = call(server, "/v1/completions", {**body})
        chunks = sse(server, "/v1/completions", {**body, "stream": True})
        assert len(chunks) > 2, chunks  # really piece by piece
        assert all(c["object"] == "text_completion" and c["model"] == name for c in chunks)
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert text == full["choices"][0]["text"], (method, text, full)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert chunks[-1]["usage"]["completion_tokens"] == full["usage"]["completion_tokens"]
        assert whole  # the 8-token answer exists too
        call(server, "/v1/unload_lora_adapter", {"lora_name": name})
    chat = sse(server, "/v1/chat/completions", {
        "model": "base", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6,
        "stream": True})
    assert chat[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chat)
    assert chat[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    status, err = call(server, "/v1/completions", {"model": "nope", "prompt": "x",
                                                   "stream": True})
    assert status == 404 and err["object"] == "error"


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (0 when the series does not exist yet)."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = "^" + re.escape(name + (f"{{{want}}}" if want else "")) + r" (\S+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


def test_metrics_limits_ignore_eos_and_a_vanished_stream_stops_generating(server):
    generated = metric(server, "kubetune_serve_generation_tokens_total", model="base")
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 20, "temperature": 0,
            "ignore_eos": True}
    status, out = call(server, "/v1/completions", body)
    assert status == 200, out
    assert out["usage"]["completion_tokens"] == 20 and out["choices"][0]["finish_reason"] == \
        "length"
    assert metric(server, "kubetune_serve_generation_tokens_total", model="base") == \
        generated + 20
    assert metric(server, "kubetune_serve_requests_total", model="base", finish="length") >= 1

    # Limits, with vLLM's wording for the context length.
    _, models = call(server, "/v1/models")
    max_len = models["data"][0]["max_model_len"]
    assert max_len == 512  # the tiny model's max_position_embeddings
    errors = metric(server, "kubetune_serve_request_errors_total", status="400")
    status, err = call(server, "/v1/completions", {**body, "max_tokens": max_len})
    assert status == 400 and f"maximum context length is {max_len} tokens" in err["message"]
    status, err = call(server, "/v1/completions", {**body, "max_tokens": 0})
    assert status == 400 and "max_tokens" in err["message"]
    status, err = call(server, "/v1/completions", {**body, "temperature": "hot"})
    assert status == 400 and "temperature" in err["message"]
    assert metric(server, "kubetune_serve_request_errors_total", status="400") == errors + 3

    # A streaming client that reads one chunk and goes away: generation stops early instead
    # of running to max_tokens (nobody would read it) and the server keeps serving.
    long = max_len - 32
    cancelled = metric(server, "kubetune_serve_requests_total", model="base", finish="cancelled")
    generated = metric(server, "kubetune_serve_generation_tokens_total", model="base")
    where = urlparse(server)
    payload = json.dumps({**body, "max_tokens": long, "stream": True}).encode()
    with socket.create_connection((where.hostname, where.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: serve\r\n"
                     b"Content-Type: application/json\r\n"
                     + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        received = b""
        while b"\r\n\r\ndata: " not in received:
            data = sock.recv(4096)
            assert data, received
            received += data
        assert received.startswith(b"HTTP/1.1 200"), received
    # The socket is closed here, after one chunk.
    deadline = time.monotonic() + 120
    while metric(server, "kubetune_serve_requests_total", model="base",
                 finish="cancelled") == cancelled:
        assert time.monotonic() < deadline, "the abandoned stream never stopped"
        time.sleep(0.1)
    made = metric(server, "kubetune_serve_generation_tokens_total", model="base") - generated
    print(f"abandoned stream: {made:.0f} of {long} tokens generated")
    assert 1 <= made < long, made
    assert metric(server, "kubetune_serve_requests_running") == 0
    status, out = call(server, "/v1/completions", body)
    assert status == 200 and out["usage"]["completion_tokens"] == 20
