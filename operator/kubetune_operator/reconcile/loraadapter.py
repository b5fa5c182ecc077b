"""LoRAAdapter reconcile, pure: the verified artifact, the target's replicas as observed (what
each serving pod lists on /v1/models), the other versions of the same alias and the promotion
gates → what to load or unload on which replica, and the status rebuilt from that world.

No I/O and no clock reads; the controller observes, applies, observes again and asks for the
status of what it then sees."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from kubetune import reasons
from kubetune.artifacts import pinned
from kubetune.behaviour import Probe
from kubetune.api.finetunejob import MERGEABLE_METHODS as MERGEABLE
from kubetune.api.loraadapter import LoRAAdapter

from .. import conditions as cond

FINALIZER = "kubetune.io/adapter-unload"
MAX_FAILURES = 10
# Methods each runtime can hot-swap; merging works for the additive/rescaling ones (MERGEABLE).
SERVABLE = {"vllm": {"LoRA", "QLoRA"},
            "kubetune": {"LoRA", "QLoRA", "IA3", "PrefixTuning", "Adapter"}}


@dataclass
class Verification:
    """What the artifact check found (reason is CamelCase; ok only if every digest matched)."""
    ok: bool
    reason: str
    message: str
    uri: str | None = None
    digest: str | None = None
    method: str | None = None
    rank: int | None = None
    base_uri: str | None = None
    base_revision: str | None = None
    merged_uri: str | None = None
    probe: Probe | None = None  # what a replica serving it must answer (kubetune.behaviour)
    dataset_sha256: str | None = None  # lineage, from the verified manifest
    tracking_run_id: str | None = None


@dataclass
class Replica:
    """One ready serving pod and what it says it serves (models: id → root)."""
    pod: str
    ip: str | None
    models: dict[str, str] | None = None
    base_root: str | None = None
    error: str | None = None  # why /v1/models could not be read
    error_reason: str | None = None  # its reason (kubetune.reasons), e.g. Unauthorized
    # The adapter's answer to the manifest's probe on this replica: "ok", "mismatch" (with
    # `behaviour_message`), "unknown" (not asked yet or no answer) or None (not checked).
    behaviour: str | None = None
    behaviour_message: str = ""

    def serves(self, name: str, path: str) -> bool:
        """Lists the adapter at `path` and, where its behaviour is checked, reproduces it."""
        return self.models is not None and self.models.get(name) == path and \
            self.behaviour in (None, "ok")


@dataclass
class Failure:
    pod: str
    reason: str
    message: str


@dataclass
class Decision:
    want: str  # "load" | "unload" | "hold" (keep what is there)
    reason: str
    message: str
    successor: str | None = None  # the alias member that replaces this one


def lora_path(adapter: LoRAAdapter, v: Verification, vllm_dir: str) -> str:
    """What the engine is told to load: the S3 prefix pinned to the verified manifest for
    kubetune serve (it fetches and verifies itself, and refuses another manifest), the synced
    folder for vLLM (its sidecar puts the files there after checking the same digest). Either
    names the digest: a new manifest at the same URI is a new path, so replicas are replaced."""
    runtime = adapter.spec.target.runtime if adapter.spec.target else "kubetune"
    if runtime == "vllm":
        return f"{vllm_dir.rstrip('/')}/{adapter.spec.serving_name}-{(v.digest or '')[:12]}"
    return pinned(v.uri or "", v.digest)


def compatibility(adapter: LoRAAdapter, v: Verification) -> tuple[bool, str, str]:
    spec = adapter.spec
    if v.base_uri and v.base_uri != spec.base_model.uri:
        return False, "BaseModelMismatch", (f"the artifact was trained on {v.base_uri}; "
                                            f"spec.baseModel.uri is {spec.base_model.uri}")
    if spec.base_model.revision and v.base_revision and \
            v.base_revision != spec.base_model.revision:
        return False, "BaseModelMismatch", (f"the artifact was trained on revision "
                                            f"{v.base_revision}; spec.baseModel.revision is "
                                            f"{spec.base_model.revision}")
    max_rank = spec.compatibility.max_rank
    if max_rank and v.rank and v.rank > max_rank:
        return False, "RankTooHigh", (f"LoRA rank {v.rank} exceeds the server's max rank "
                                      f"{max_rank} (spec.compatibility.maxRank)")
    if spec.target is not None:
        runtime = spec.target.runtime
        mode = resolve_mode(adapter, v.method)
        if mode == "HotSwap" and v.method not in SERVABLE[runtime]:
            return False, "MethodNotServable", (
                f"{runtime} cannot hot-swap {v.method} adapters (it serves "
                f"{', '.join(sorted(SERVABLE[runtime]))}); use runtime kubetune"
                + (" or mode Merged" if v.method in MERGEABLE else ""))
        if mode == "Merged" and v.method not in MERGEABLE:
            return False, "MethodNotMergeable", (f"{v.method} adapters cannot be merged into "
                                                 f"the base model; use mode HotSwap with "
                                                 f"runtime kubetune")
    return True, "Compatible", f"{v.method} adapter for {spec.base_model.uri}" + (
        f", rank {v.rank}" if v.rank else "")


def resolve_mode(adapter: LoRAAdapter, method: str | None) -> str:
    mode = adapter.spec.mode
    if mode != "Auto":
        return mode
    runtime = adapter.spec.target.runtime if adapter.spec.target else "kubetune"
    if method and method not in SERVABLE[runtime] and method in MERGEABLE:
        return "Merged"
    return "HotSwap"


def gates(adapter: LoRAAdapter, own: list[dict], source: dict | None) -> tuple[bool, str]:
    """promotion.requires: every named condition True on the source FineTuneJob or here."""
    missing = []
    for req in (adapter.spec.promotion.requires if adapter.spec.promotion else []):
        if req.object == "FineTuneJob":
            if source is None:
                missing.append(f"FineTuneJob condition {req.condition_type} (no source "
                               f"FineTuneJob found)")
            elif not cond.is_true((source.get("status") or {}).get("conditions") or [],
                                  req.condition_type):
                missing.append(f"FineTuneJob {source['metadata']['name']} condition "
                               f"{req.condition_type}")
        elif not cond.is_true(own, req.condition_type):
            missing.append(f"LoRAAdapter condition {req.condition_type}")
    if missing:
        return False, "waiting for " + ", ".join(missing) + " to be True"
    return True, ""


def _current(obj: dict, kind: str) -> dict | None:
    """A condition of another adapter, only if it describes that adapter's current spec."""
    status = obj.get("status") or {}
    found = cond.find(status.get("conditions") or [], kind)
    if found and found.get("observedGeneration") == obj["metadata"].get("generation"):
        return found
    return None


def _order(obj: dict) -> tuple:
    return (obj["metadata"].get("creationTimestamp") or "", obj["metadata"]["name"])


def same_group(me: dict, other: dict) -> bool:
    a, b = me.get("spec") or {}, other.get("spec") or {}
    return bool(a.get("alias")) and a.get("alias") == b.get("alias") and \
        (a.get("target") or {}).get("deployment") == (b.get("target") or {}).get("deployment") \
        and other["metadata"]["name"] != me["metadata"]["name"]


def decide(me: dict, eligible: bool, members: list[dict]) -> Decision:
    """Load, unload or hold, given the other versions of the same alias on the same target.

    The newest promoted version wins. Older versions stay loaded until the winner is Ready on
    every replica, so clients never see a moment without an adapter of the alias; a version
    being deleted (a Git revert) hands over the same way."""
    deleting = bool(me["metadata"].get("deletionTimestamp"))
    others = [m for m in members if not m["metadata"].get("deletionTimestamp")]
    candidates = [m for m in others if (_current(m, "Promoted") or {}).get("status") == "True"]
    if eligible and not deleting:
        candidates.append(me)
    winner = max(candidates, key=_order) if candidates else None
    if winner is me:
        return Decision("load", "Serving", "")
    if winner is None:
        if deleting:
            return Decision("unload", "Deleting", "the adapter is being deleted")
        return Decision("unload", "NotPromoted", "")
    name = winner["metadata"]["name"]
    ready = (_current(winner, "Ready") or {}).get("status") == "True" and (
        (_current(winner, "Loaded") or {}).get("status") == "True" or
        (_current(winner, "RolledOut") or {}).get("status") == "True")
    if ready:
        return Decision("unload", "Superseded", f"superseded by {name} (alias "
                                                f"{me['spec'].get('alias')})", name)
    if not eligible and not deleting:
        return Decision("unload", "NotPromoted", "", name)
    return Decision("hold", "HandingOver", f"stays loaded until {name} is ready on every "
                                           f"replica", name)


def keep_through_transient(decision: Decision, v: Verification, deleting: bool) -> Decision:
    """An unload caused only by a transient failure (S3 down, the source not readable right
    now) becomes a hold: what is served stays served until the artifact can be judged."""
    if not v.ok and reasons.kind(v.reason) == "transient" and decision.want == "unload" and \
            not deleting:
        return Decision("hold", v.reason, v.message)
    return decision


def actions(replicas: list[Replica], name: str, path: str, want: str
            ) -> tuple[list[Replica], list[Replica], list[Replica]]:
    """(load here, unload here, unload then load here: a stale version under our name)."""
    load, unload, replace = [], [], []
    for r in replicas:
        if r.models is None:
            continue
        root = r.models.get(name)
        if want == "load":
            if root is None:
                load.append(r)
            elif root != path:
                replace.append(r)
        elif want == "unload" and root is not None:
            unload.append(r)
    return load, unload, replace


def failures_for(replicas: list[Replica], name: str, path: str, want: str,
                 errors: dict[str, Failure], base_uri: str, runtime: str) -> list[Failure]:
    out = []
    for r in replicas:
        if r.pod in errors:
            out.append(errors[r.pod])
        elif r.models is None:
            out.append(Failure(r.pod, "Unreachable", r.error or "no answer from /v1/models"))
        elif want == "load" and r.models.get(name) != path:
            out.append(Failure(r.pod, reasons.NOT_LOADED, f"{name} is not listed by /v1/models"))
        elif want == "load" and r.behaviour == "mismatch":
            out.append(Failure(r.pod, reasons.BEHAVIOUR_MISMATCH, r.behaviour_message))
        if want == "load" and runtime == "kubetune" and r.base_root and r.base_root != base_uri \
                and not any(f.pod == r.pod for f in out):
            out.append(Failure(r.pod, "BaseModelMismatch", f"the server's base model is "
                                                           f"{r.base_root}, not {base_uri}"))
    return out


@dataclass
class StatusInputs:
    body: dict
    adapter: LoRAAdapter | None
    spec_errors: list[str]
    verification: Verification | None
    compatible: tuple[bool, str, str] | None
    promoted: tuple[bool, str] | None
    mode: str | None
    target_error: tuple[str, str] | None  # (reason, message)
    decision: Decision | None
    replicas: list[Replica] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    path: str = ""
    merged: dict | None = None  # merged-mode state: {phase, reason, message, uri, revision}
    desired: int | None = None  # replicas that should serve it (default: the ready ones)


def status(inp: StatusInputs, now: datetime) -> dict:
    body = inp.body
    generation = body["metadata"].get("generation")
    old = body.get("status") or {}
    # Conditions set by others (e.g. an evaluation gate on this adapter) are kept as they are.
    conditions = [dict(c) for c in old.get("conditions") or []]
    out: dict = {"observedGeneration": generation}

    def setc(kind, ok, reason, message=""):
        cond.set_condition(conditions, kind, ok, reason, message, generation, now)

    def finish(ready: bool, reason: str, message: str, degraded: tuple | None = None) -> dict:
        setc("Ready", ready, reason, message)
        for kind in (reasons.DEGRADED, reasons.STALLED):
            if degraded:
                setc(kind, True, *degraded)
            else:
                setc(kind, False, "AsExpected", "")
        out["conditions"] = conditions
        return {k: v for k, v in out.items() if v is not None}

    if inp.spec_errors or inp.adapter is None:
        message = "; ".join(inp.spec_errors)
        for kind in ("ArtifactVerified", "Compatible", "Promoted", "Loaded"):
            setc(kind, False, "InvalidSpec", message)
        return finish(False, "InvalidSpec", message, ("InvalidSpec", message))

    v = inp.verification
    if v is None or not v.ok:
        reason, message = (v.reason, v.message) if v else ("Pending", "not verified yet")
        setc("ArtifactVerified", False, reason, message)
        for kind in ("Compatible", "Promoted", "Loaded"):
            setc(kind, False, "ArtifactNotVerified", "")
        return finish(False, reason, message,
                      (reason, message) if reasons.degrades(reason) else None)
    out["artifact"] = {k: val for k, val in {"uri": v.uri, "manifestSha256": v.digest,
                                            "method": v.method, "rank": v.rank,
                                            "datasetSha256": v.dataset_sha256,
                                            "trackingRunId": v.tracking_run_id}.items()
                       if val is not None}
    setc("ArtifactVerified", True, "Verified",
         f"manifest sha256 {v.digest[:12]}; every file digest matches" if v.digest else "")
    ok, reason, message = inp.compatible or (True, "Compatible", "")
    setc("Compatible", ok, reason, message)
    enforce = inp.adapter.spec.compatibility.enforce
    if not ok and enforce:
        setc("Promoted", False, "Incompatible", message)
        setc("Loaded", False, "Incompatible", "nothing is loaded: " + message)
        return finish(False, reason, message, (reason, message))
    promoted, gate_message = inp.promoted or (True, "")
    setc("Promoted", promoted, "Promoted" if promoted else "GatesPending",
         gate_message or f"stage {inp.adapter.spec.stage}")
    if inp.adapter.spec.target is None:
        setc("Loaded", False, "NoTarget", "spec.target is not set; verified only")
        return finish(True, "Verified", "the artifact is verified (no serving target)")
    out["resolvedMode"] = inp.mode
    if inp.mode == "Merged":
        return _merged_status(inp, out, setc, finish, promoted, gate_message)
    if inp.target_error:
        reason, message = inp.target_error
        setc("Loaded", False, reason, message)
        return finish(False, reason, message, (reason, message))
    d = inp.decision
    desired = inp.desired if inp.desired is not None else len(inp.replicas)
    loaded = sum(1 for r in inp.replicas if r.serves(inp.adapter.spec.serving_name, inp.path))
    failed = len(inp.failures) if d and d.want == "load" else 0
    out["servedTarget"] = inp.adapter.spec.target.deployment
    out["replicas"] = {"desired": desired if d and d.want != "unload" else 0,
                       "loaded": loaded, "failed": failed}
    out["loadedReplicas"] = f"{loaded}/{out['replicas']['desired']}"
    out["failures"] = _failures(old.get("failures") or [], inp.failures, inp.replicas, now)
    out["servedRevision"] = f"sha256:{v.digest}" if loaded and v.digest else None
    if d is None or d.want == "unload":
        why = d.reason if d else "NotPromoted"
        if why == "NotPromoted":
            setc("Loaded", False, "PromotionPending", gate_message)
            return finish(False, "PromotionPending", gate_message)
        setc("Loaded", False, why, d.message if d else "")
        if loaded:
            return finish(False, "Unloading", f"unloading from {loaded} replica(s)")
        return finish(why == "Superseded", why, d.message if d else "")
    if not inp.replicas:
        setc("Loaded", False, "NoReadyReplicas", f"deployment {inp.adapter.spec.target.deployment}"
                                                 f" has no ready serving pods")
        return finish(False, "NoReadyReplicas", "waiting for ready serving pods")
    checked = any(r.behaviour is not None for r in inp.replicas)
    summary = f"loaded on {loaded}/{desired} replicas" + (
        " (each answers the manifest's probe like the trained adapter)" if checked else "")
    if loaded >= desired:
        setc("Loaded", True, "AllReplicas", summary)
        if d.want == "hold":
            return finish(True, "HandingOver", d.message)
        return finish(True, "Loaded", summary)
    first = inp.failures[0] if inp.failures else None
    detail = f"; {first.pod}: {first.reason}: {first.message}" if first else ""
    setc("Loaded", False, "PartiallyLoaded" if loaded else "NotLoaded", summary + detail)
    degraded = ("ReplicasFailed", f"{failed} replica(s) failed{detail}") if failed else None
    return finish(False, "Loading", summary + detail, degraded)


def _merged_status(inp, out, setc, finish, promoted, gate_message):
    m = inp.merged or {}
    out["mergedModelUri"] = m.get("uri")
    out["servedRevision"] = m.get("revision")
    setc("Loaded", False, "MergedMode", "merged into the base model; nothing is hot-swapped")
    if not promoted:
        setc("RolledOut", False, "PromotionPending", gate_message)
        return finish(False, "PromotionPending", gate_message)
    phase, reason, message = m.get("phase", "Pending"), m.get("reason", "Pending"), \
        m.get("message", "")
    if phase == "RolledOut":
        setc("RolledOut", True, reason, message)
        return finish(True, "RolledOut", message)
    if phase == "Superseded":
        setc("RolledOut", False, "Superseded", message)
        return finish(True, "Superseded", message)
    setc("RolledOut", False, reason, message)
    if phase == "Failed":
        return finish(False, reason, message, (reason, message))
    return finish(False, reason, message)


def _failures(old: list[dict], new: list[Failure], replicas: list[Replica], now: datetime
              ) -> list[dict] | None:
    """Recent failures, newest first, bounded. A failure that persists keeps its first time."""
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    seen = {(f["pod"], f["reason"], f.get("message", "")): f.get("time") for f in old}
    fresh = [{"pod": f.pod, "reason": f.reason, "message": f.message[:4000],
              "time": seen.get((f.pod, f.reason, f.message[:4000])) or stamp} for f in new]
    keys = {(f["pod"], f["reason"], f["message"]) for f in fresh}
    history = [f for f in old if (f["pod"], f["reason"], f.get("message", "")) not in keys]
    return (fresh + history)[:MAX_FAILURES] or None


@dataclass
class Acted:
    """What the controller did to replicas this pass (pod names)."""
    loaded: list[str] = field(default_factory=list)  # loads and replacements
    unloaded: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    """The rest of a hot-swap pass, decided from what the replicas now say: Events, whether
    the finalizer goes (deleting, and unloaded everywhere), the status, when to look again."""
    events: list[tuple[str, str, str]]
    release: bool
    status: dict | None  # None while being deleted (nothing is written)
    requeue_after: float


def hot_swap_outcome(inp: StatusInputs, acted: Acted, errors: dict[str, Failure],
                     deleting: bool, left_behind: str | None, resync: float,
                     now: datetime) -> Outcome:
    name = inp.adapter.spec.serving_name
    d = inp.decision
    events = [("Normal", reasons.LOADED_ON_REPLICA, f"Loaded {name} on pod {pod}")
              for pod in acted.loaded if pod not in errors]
    events += [("Normal", reasons.UNLOADED_FROM_REPLICA, f"Unloaded {name} from pod {pod}"
                + (f" ({d.message})" if d.message else ""))
               for pod in acted.unloaded if pod not in errors]
    events += [("Warning", reasons.LOAD_FAILED, f"pod {f.pod}: {f.reason}: {f.message}")
               for f in errors.values()]
    if deleting:
        still = any(r.models and name in r.models for r in inp.replicas)
        release = d.want == "unload" and not still
        return Outcome(events, release, None, 1.0)
    st = status(inp, now)
    if left_behind:  # not yet unloaded everywhere on the old target: look again soon
        st["servedTarget"] = left_behind
    counts = st.get("replicas") or {}
    pending = d.want == "hold" or bool(acted.loaded or acted.unloaded or errors) or \
        bool(left_behind) or counts.get("loaded") != counts.get("desired")
    return Outcome(events, False, st, min(resync, 2.0) if pending else resync)
