"""`kubetune serve` against hostile clients, as a real process on the built-in tiny model: the
API key guards every admin and inference route, limits are checked before work is done, and a
failed load leaves nothing resident."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from adapterfactory import make_adapter
from helpers import request_json, start_serve

pytestmark = pytest.mark.trainer

KEY = "k-" + os.urandom(8).hex()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    url, proc = start_serve(tmp_path_factory.mktemp("serve-hardened"),
                            "--model", "builtin://tiny-llama", "--revision", "v1",
                            "--served-model-name", "base", "--max-loras=4",
                            "--max-lora-rank=16", "--max-virtual-tokens=32",
                            "--max-request-bytes=65536", env={"KUBETUNE_API_KEY": KEY})
    yield url, proc
    proc.terminate()
    proc.wait(timeout=20)


def call(url: str, path: str, body: dict | None = None, key: str | None = KEY,
         timeout: float = 60) -> tuple[int, object]:
    return request_json(url + path, body, timeout, key)


ROUTES = [("/v1/models", None), ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/"}),
          ("/v1/unload_lora_adapter", {"lora_name": "x"}),
          ("/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 1}),
          ("/v1/chat/completions", {"model": "base", "max_tokens": 1,
                                    "messages": [{"role": "user", "content": "hi"}]}),
          ("/nowhere", None)]


@pytest.mark.parametrize("path,body", ROUTES)
def test_every_route_but_health_and_metrics_needs_the_key(server, path, body):
    url, _ = server
    for key in (None, "wrong", KEY[:-1], KEY + "x"):
        status, err = call(url, path, body, key=key)
        assert status == 401 and err["type"] == "AuthenticationError", (key, status, err)
    status, _ = call(url, path, body)
    assert status != 401


def test_health_and_metrics_stay_open_and_models_need_no_storage_secret(server):
    url, _ = server
    assert call(url, "/health", key=None)[0] == 200
    assert call(url, "/metrics", key=None)[0] == 200


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}"
                     f"\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n\r\n"
                     .encode())
        answer = sock.recv(65536).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413"), answer[:200]


def test_a_prompt_that_cannot_fit_is_refused_before_tokenising(server):
    url, _ = server
    status, models = call(url, "/v1/models")
    max_len = models["data"][0]["max_model_len"]
    from transformers import AutoTokenizer

    from adapterfactory import base_path

    longest = max(len(t) for t in AutoTokenizer.from_pretrained(str(base_path())).get_vocab())
    prompt = "a" * (max_len * longest + 1)
    if len(prompt) > 60_000:  # keep the body under the server's 64 KiB limit
        pytest.fail(f"tiny model's context ({max_len} × {longest}) is larger than this test "
                    f"assumes")
    status, err = call(url, "/v1/completions", {"model": "base", "prompt": prompt})
    assert status == 400 and "cannot fit" in err["message"], err
    status, err = call(url, "/v1/completions", {"model": "base", "prompt": "hi",
                                                "max_tokens": max_len + 1})
    assert status == 400 and "max_tokens" in err["message"]


def _edit_config(path: Path, **changes) -> Path:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def test_rank_pattern_and_virtual_tokens_are_held_to_the_limits(server, tmp_path):
    url, _ = server
    sneaky = _edit_config(make_adapter(tmp_path / "sneaky", "LoRA", rank=8),
                          rank_pattern={"q_proj": 512})
    status, err = call(url, "/v1/load_lora_adapter", {"lora_name": "sneaky",
                                                      "lora_path": str(sneaky)})
    assert status == 400 and "rank_pattern" in err["message"] and "16" in err["message"], err
    weird = _edit_config(make_adapter(tmp_path / "weird", "LoRA", rank=8),
                         alpha_pattern={"q_proj": "lots"})
    status, err = call(url, "/v1/load_lora_adapter", {"lora_name": "weird",
                                                      "lora_path": str(weird)})
    assert status == 400 and "alpha_pattern" in err["message"], err
    long = _edit_config(make_adapter(tmp_path / "long", "PrefixTuning"),
                        num_virtual_tokens=100_000)
    status, err = call(url, "/v1/load_lora_adapter", {"lora_name": "long",
                                                      "lora_path": str(long)})
    assert status == 400 and "max_virtual_tokens 32" in err["message"], err
    _, models = call(url, "/v1/models")
    assert [m["id"] for m in models["data"]] == ["base"]


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_failed_load_leaves_nothing_resident(server, tmp_path):
    """An adapter whose weights do not fit the model fails after PEFT has injected its layers:
    the half-loaded adapter is removed, so the same name loads cleanly afterwards and repeated
    failures do not grow the process."""
    url, proc = server
    good = make_adapter(tmp_path / "good", "LoRA", rank=8, seed=5)
    assert call(url, "/v1/load_lora_adapter", {"lora_name": "first",
                                               "lora_path": str(good)})[0] == 200
    broken = make_adapter(tmp_path / "broken", "LoRA", rank=8, seed=6)
    _edit_config(broken, r=4, lora_alpha=8)  # the saved tensors are rank 8: a shape mismatch
    # warm-up failure (first-time allocations), then measure
    call(url, "/v1/load_lora_adapter", {"lora_name": "victim", "lora_path": str(broken)})
    baseline = _rss(proc.pid)
    for _ in range(5):
        status, err = call(url, "/v1/load_lora_adapter", {"lora_name": "victim",
                                                          "lora_path": str(broken)})
        assert status == 400 and "cannot load adapter 'victim'" in err["message"], err
    grown = _rss(proc.pid) - baseline
    assert grown < 32 * 1024 * 1024, f"RSS grew by {grown / 2**20:.1f} MiB over 5 failed loads"
    status, text = call(url, "/v1/load_lora_adapter", {"lora_name": "victim",
                                                       "lora_path": str(good)})
    assert status == 200, text
    prompt = {"prompt": "The sky is", "max_tokens": 8}
    assert call(url, "/v1/completions", {"model": "victim", **prompt})[1]["choices"][0]["text"] \
        == call(url, "/v1/completions", {"model": "first", **prompt})[1]["choices"][0]["text"]
    for name in ("first", "victim"):
        assert call(url, "/v1/unload_lora_adapter", {"lora_name": name})[0] == 200
