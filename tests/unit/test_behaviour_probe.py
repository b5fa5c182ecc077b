"""Judging a replica by its answer to the manifest's probe (kubetune.behaviour), on the shapes
vLLM and OpenAI return, including tokens that detokenize alike and collide."""

from __future__ import annotations

import math

import pytest

from kubetune.behaviour import Probe, distance, judge, top_entries

pytestmark = pytest.mark.unit

ADAPTER = [{"id": 1, "token": " red", "logprob": -0.4}, {"id": 2, "token": " green",
                                                         "logprob": -1.6},
           {"id": 3, "token": "\ufffd", "logprob": -2.5}, {"id": 4, "token": "\ufffd",
                                                            "logprob": -2.9},
           {"id": 5, "token": " the", "logprob": -3.1}]
BASE = [{"id": 6, "token": " It", "logprob": -1.1}, {"id": 1, "token": " red",
                                                     "logprob": -2.0},
        {"id": 7, "token": " a", "logprob": -2.2}, {"id": 5, "token": " the", "logprob": -2.6},
        {"id": 2, "token": " green", "logprob": -3.3}]
PROBE = Probe.from_manifest({"text": "What color is the apple?", "topLogprobs": ADAPTER,
                             "baseTopLogprobs": BASE})


def as_completions(entries, noise=0.0) -> dict:
    """The completions API's dict: later same-text tokens overwrite earlier ones (vLLM)."""
    return {e["token"]: e["logprob"] + noise for e in entries}


def test_the_trained_adapter_passes_even_in_bfloat16_and_with_collisions():
    got = top_entries(as_completions(ADAPTER, noise=0.04))
    assert len(got) == 4  # two byte tokens became one key
    verdict = judge(PROBE, got)
    assert verdict.ok and verdict.distance == pytest.approx(0.04), verdict
    assert judge(PROBE, top_entries(
        [{"token": e["token"], "logprob": e["logprob"]} for e in ADAPTER])).ok  # chat shape


def test_the_base_model_behind_an_accepted_adapter_is_caught():
    verdict = judge(PROBE, top_entries(as_completions(BASE)))
    assert not verdict.ok and "base model" in verdict.message and verdict.distance > 1


def test_another_adapter_is_caught_and_a_token_outside_the_top_k_may_not_outrank_it():
    other = [{"token": " blue", "logprob": -0.2}, {"token": " red", "logprob": -2.0}]
    verdict = judge(PROBE, top_entries(as_completions(other)))
    assert not verdict.ok and "base model" not in verdict.message
    assert distance(PROBE.adapter, top_entries({" blue": -3.5})) == 0  # below the k-th


def test_an_adapter_that_barely_moves_the_probe_says_the_probe_cannot_tell():
    flat = Probe.from_manifest({"text": "x", "topLogprobs": BASE[:3], "baseTopLogprobs":
                                [{**e, "logprob": e["logprob"] - 0.01} for e in BASE[:3]]})
    verdict = judge(flat, top_entries(as_completions(BASE[:3])))
    assert verdict.ok and "cannot tell" in verdict.message


@pytest.mark.parametrize("probe", [
    None, {}, {"text": "x"}, {"text": "", "topLogprobs": ADAPTER},
    {"text": "x", "topLogprobs": [{"token": "a", "logprob": 0.5}]},  # a probability > 1
    {"text": "x", "topLogprobs": [{"token": "a", "logprob": "-1"}]},
    {"text": "x", "topLogprobs": [{"token": "a", "logprob": -1}] * 21},
    {"text": "x", "lastTokenLogits": [0.1]},  # an older manifest: not checked
])
def test_a_missing_or_malformed_probe_is_not_checked(probe):
    assert Probe.from_manifest(probe) is None


@pytest.mark.parametrize("top", [None, [], {}, "x", {"a": float("nan")}, {"a": 3.0},
                                 [{"token": 1, "logprob": -1}], {str(i): -1 for i in range(101)}])
def test_a_malformed_server_answer_is_refused(top):
    assert top_entries(top) is None


def test_distance_of_nothing_is_infinite():
    assert distance(PROBE.adapter, ()) == math.inf
