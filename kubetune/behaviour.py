"""Is a replica serving the trained adapter? Judged by behaviour, not by what its API lists.

A serving engine can accept an adapter and still answer with the base model (vLLM issue 55193).
At training time the trainer records the *probe* in the manifest: for a fixed prompt, the top-k
log-probabilities of the next token with the adapter, and the same for the base model (adapter
disabled). After a load the operator asks the replica for that prompt through the completions
API (``max_tokens: 1, temperature: 0, logprobs: k``: vLLM's and OpenAI's shape, which
``kubetune serve`` speaks too) and compares.

The comparison matches returned tokens by their text to the recorded ones and compares the
log-probs (several byte tokens detokenize to the same text and collide in the completions API's
dict; one of them survives, so a match against any of them counts). Numerics differ between a
CPU trainer in float32 and a GPU server in bfloat16, so a tolerance applies; when the adapter
barely moves the probe (closer to the base than the tolerance) the probe cannot tell the two
apart and the check says so instead of pretending.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PROBE_TOP = 5  # top-k log-probs recorded and asked for
DEFAULT_TOLERANCE = 0.1  # nats (spec.compatibility.probeTolerance)

Top = tuple[tuple[str, float], ...]  # (token text, log-prob), most likely first


@dataclass(frozen=True)
class Probe:
    """The manifest's probe, checked: a prompt and the top-k next tokens with their log-probs,
    with the adapter and (when the trainer could switch it off) without."""
    text: str
    adapter: Top
    base: Top | None = None

    @classmethod
    def from_manifest(cls, probe: object) -> "Probe | None":
        """None when the manifest has no usable probe (older artifacts: not checked)."""
        if not isinstance(probe, dict) or not isinstance(probe.get("text"), str) or \
                not 0 < len(probe["text"]) <= 1000:
            return None
        adapter = _entries(probe.get("topLogprobs"))
        if adapter is None:
            return None
        return cls(probe["text"], adapter, _entries(probe.get("baseTopLogprobs")))

    @property
    def distinguishable(self) -> float:
        """How far the adapter moved the probe from the base (inf when unknown)."""
        return distance(self.adapter, self.base) if self.base else math.inf


def _logprob(value: object) -> float | None:
    if type(value) not in (int, float) or not math.isfinite(value) or value > 1e-6:
        return None
    return float(value)


def _entries(entries: object) -> Top | None:
    if not isinstance(entries, list) or not 0 < len(entries) <= 20:
        return None
    out = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
            return None
        value = _logprob(entry.get("logprob"))
        if value is None:
            return None
        out.append((entry["token"][:100], value))
    return tuple(sorted(out, key=lambda e: -e[1]))


def top_entries(top: object) -> Top | None:
    """One position's top log-probs as a server returned them: a dict token → log-prob
    (completions API; tokens that detokenize alike collide there) or a list of
    {token, logprob} (chat API). None if malformed."""
    if isinstance(top, dict):
        items = list(top.items())
    elif isinstance(top, list):
        items = [(e.get("token"), e.get("logprob")) if isinstance(e, dict) else (None, None)
                 for e in top]
    else:
        return None
    if not items or len(items) > 100:
        return None
    out = []
    for token, value in items:
        value = _logprob(value)
        if not isinstance(token, str) or value is None:
            return None
        out.append((token[:100], value))
    return tuple(sorted(out, key=lambda e: -e[1]))


def distance(expected: Top, got: Top) -> float:
    """How far a server's top log-probs are from the expected ones, in nats: each returned
    token against the expected log-prob of the same text (when texts collide, the closest),
    and a token outside the expected top-k may not be more likely than the expected k-th."""
    if not expected or not got:
        return math.inf
    worst = 0.0
    floor = expected[-1][1]
    for token, value in got[:len(expected)]:
        same = [e for t, e in expected if t == token]
        worst = max(worst, min(abs(value - e) for e in same) if same else
                    max(0.0, value - floor))
    return worst


@dataclass(frozen=True)
class Verdict:
    ok: bool
    message: str
    distance: float


def judge(probe: Probe, got: Top, tolerance: float = DEFAULT_TOLERANCE) -> Verdict:
    """Does the replica's answer reproduce the trained adapter's probe?"""
    near = distance(probe.adapter, got)
    if near <= tolerance:
        if probe.distinguishable <= tolerance:
            return Verdict(True, f"reproduces the probe within {near:.3f} nats (the adapter "
                                 f"moves it only {probe.distinguishable:.3f} from the base "
                                 f"model: the probe cannot tell them apart)", near)
        return Verdict(True, f"reproduces the probe within {near:.3f} nats", near)
    shown = ", ".join(f"{t!r}: {v:.3f}" for t, v in got[:len(probe.adapter)])
    message = (f"answers the probe prompt with top log-probs {{{shown}}}, {near:.3f} nats "
               f"from the trained adapter's (tolerance {tolerance:g})")
    if probe.base is not None and distance(probe.base, got) <= tolerance:
        message += "; that is the base model: the adapter is listed but not applied"
    return Verdict(False, message, near)
