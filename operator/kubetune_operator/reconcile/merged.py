"""Merged mode, pure: the observed world (the verified artifact, the alias decision, the target
Deployment, its pods, the merge Job and its pods, whether the merged model is in S3) → a plan
(the merge Job to create, the Deployment patch, Events, the merged state for the status, when
to look again). No I/O and no clock reads; `merged.py` observes and applies.

The steps: merge Job (trainer image) → merged model in S3 (with a manifest naming the adapter
digest) → the target Deployment's model switched to it (a new revision) → the rollout watched →
on failure (progress deadline, crash loops) the previous model restored. What was done is read
back from the world: the merged model's manifest, the merge Job, the Deployment's model argument
and its annotations (PREVIOUS, ADAPTER, ROLLED_BACK)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from kubetune import reasons

from ..policy import not_opted_in_message
from .loraadapter import Decision, Verification

PREVIOUS = "kubetune.io/previous-model"
ADAPTER = "kubetune.io/merged-adapter"
ROLLED_BACK = "kubetune.io/rolled-back-model"
ROLLBACK_REASON = "kubetune.io/rollback-reason"  # why: the status keeps saying it after
CRASH_RESTARTS = 2
ACTIVE_RECHECK = 5.0  # seconds: a safety net while merging or rolling out (events drive it)


def merged_uri(adapter_uri: str) -> str:
    return adapter_uri.rstrip("/") + "-merged"


def model_of(container: dict) -> str | None:
    """The served model: `--model X` / `--model=X` in command+args, else $KUBETUNE_MODEL."""
    argv = (container.get("command") or []) + (container.get("args") or [])
    for i, part in enumerate(argv):
        if part == "--model" and i + 1 < len(argv):
            return argv[i + 1]
        if part.startswith("--model="):
            return part.split("=", 1)[1]
    return next((e.get("value") for e in container.get("env") or []
                 if e.get("name") == "KUBETUNE_MODEL"), None)


def with_model(container: dict, model: str) -> dict:
    """The container patched to serve `model` (same place the model was named)."""
    out = json.loads(json.dumps(container))
    for key in ("command", "args"):
        parts = out.get(key) or []
        for i, part in enumerate(parts):
            if part == "--model" and i + 1 < len(parts):
                parts[i + 1] = model
                return out
            if part.startswith("--model="):
                parts[i] = f"--model={model}"
                return out
    env = [e for e in out.get("env") or [] if e.get("name") != "KUBETUNE_MODEL"]
    out["env"] = [*env, {"name": "KUBETUNE_MODEL", "value": model}]
    return out


def container_index(deployment: dict, name: str | None) -> int | None:
    """Where the serving container is (the named one, else the first); None if absent."""
    for i, c in enumerate(deployment["spec"]["template"]["spec"]["containers"]):
        if name is None or c["name"] == name:
            return i
    return None


@dataclass
class MergedWorld:
    """What the controller observed for one merged-mode adapter. Pods are the serving cache's
    small views (cache.pod_view): `models` (container → model), `statuses`, `unschedulable`."""
    name: str
    namespace: str
    target: str  # spec.target.deployment
    verification: Verification
    decision: Decision
    deleting: bool = False
    deployment: dict | None = None
    opted_in: bool = True
    container: str | None = None  # spec.target.container
    rollback_on_failure: bool = True
    progress_deadline_seconds: int = 600
    max_unavailable: int | str = 0
    rivals: frozenset[str] = frozenset()  # other adapters on the Deployment, not this alias
    merged_ready: bool = False  # the merged model's manifest names this digest
    merge_job_name: str = ""  # its deterministic name (resources/loraadapter.py)
    merge_job: dict | None = None
    merge_pods: list[dict] = field(default_factory=list)
    pods: list[dict] = field(default_factory=list)  # the Deployment's pods


@dataclass
class MergedPlan:
    state: dict = field(default_factory=dict)  # phase, reason, message, uri, revision
    create_merge_job: bool = False
    patch: dict | None = None  # a merge patch for the Deployment
    events: list[tuple[str, str, str]] = field(default_factory=list)
    finalized: bool = False  # deleting: nothing of ours is left on the Deployment
    active: bool = False  # merging or rolling out: look again soon (ACTIVE_RECHECK)


def _state(phase: str, reason: str, message: str = "", **extra) -> dict:
    return {"phase": phase, "reason": reason, "message": message, **extra}


def plan(w: MergedWorld) -> MergedPlan:
    if w.deleting:
        return _restore(w)
    v = w.verification
    if not v.ok:
        return MergedPlan(_state("Pending", reasons.ARTIFACT_NOT_VERIFIED))
    out_uri = merged_uri(v.uri or "")
    where = {"uri": out_uri}
    dep = w.deployment
    if dep is None:
        return MergedPlan(_state("Failed", reasons.TARGET_NOT_FOUND, f"deployment {w.target} "
                                 f"not found in {w.namespace}", **where))
    dep_name = dep["metadata"]["name"]
    if not w.opted_in:
        return MergedPlan(_state("Failed", reasons.TARGET_NOT_OPTED_IN,
                                 not_opted_in_message(w.target, w.namespace), **where))
    d = w.decision
    if d.want != "load":
        phase = "Superseded" if d.reason == "Superseded" else "Pending"
        reason = d.reason if d.reason != "NotPromoted" else "PromotionPending"
        return MergedPlan(_state(phase, reason, d.message, **where))
    annotations = dep["metadata"].get("annotations") or {}
    holder = annotations.get(ADAPTER)
    if holder in w.rivals:
        return MergedPlan(_state(
            "Failed", "TargetInUse",
            f"deployment {dep_name} already serves the merged adapter {holder} (not a version "
            f"of this alias); a Deployment serves one merged model: delete {holder} or target "
            f"another Deployment", **where))
    if not w.merged_ready:
        return _merge(w, out_uri, where)
    if annotations.get(ROLLED_BACK) == out_uri:
        why = annotations.get(ROLLBACK_REASON)
        return MergedPlan(_state(
            "Failed", "RolledBack", f"the rollout of {out_uri} failed"
            + (f" ({why})" if why else "") + f" and was rolled back to "
            f"{annotations.get(PREVIOUS)}; apply a new adapter version to try again", **where))
    index = container_index(dep, w.container)
    if index is None:
        return MergedPlan(_state("Failed", "TargetNotFound", f"container {w.container} not "
                                 f"found in deployment {dep_name}", **where))
    current = model_of(dep["spec"]["template"]["spec"]["containers"][index])
    if current != out_uri:
        return MergedPlan(_state("RollingOut", "RollingOut",
                                 f"deployment {dep_name}: {current} -> {out_uri}", **where),
                          patch=_switch(w, index, out_uri, current), active=True)
    return _watch(w, index, out_uri, where)


# ---- merge -------------------------------------------------------------------------------
def _merge(w: MergedWorld, out_uri: str, where: dict) -> MergedPlan:
    job = w.merge_job
    if job is None:
        return MergedPlan(_state("Merging", "Merging", "merge Job created", **where),
                          create_merge_job=True, active=True,
                          events=[("Normal", "Merging", f"Created merge Job "
                                             f"{w.merge_job_name} -> {out_uri}")])
    job_name = job["metadata"]["name"]
    done = {c["type"]: c for c in (job.get("status") or {}).get("conditions") or []
            if c.get("status") == "True"}
    if "Failed" in done:
        message = done["Failed"].get("message", "")
        for pod in w.merge_pods:
            for st in pod.get("statuses") or []:
                if st.get("message"):
                    message = st["message"].strip().splitlines()[-1]
        return MergedPlan(_state("Failed", "MergeFailed",
                                 f"merge Job {job_name} failed: {message[:1000]}", **where))
    if "Complete" in done:
        detail = (f"completed, but {out_uri} does not name this adapter's digest yet; "
                  f"reading it again")
    else:
        detail = "is running"
        for pod in w.merge_pods:
            if pod.get("unschedulable") is not None:
                detail = f"is unschedulable: {pod['unschedulable']}"
    return MergedPlan(_state("Merging", "Merging", f"merge Job {job_name} {detail}", **where),
                      active=True)


# ---- rollout -----------------------------------------------------------------------------
def _with_container(dep: dict, index: int, model: str) -> list[dict]:
    containers = list(dep["spec"]["template"]["spec"]["containers"])
    containers[index] = with_model(containers[index], model)
    return containers


def _switch(w: MergedWorld, index: int, model: str, current: str | None) -> dict:
    """The Deployment patch that serves `model`: the model it served before is remembered
    (kept when it is this adapter's own earlier merged model: a revert goes to the original)."""
    annotations = w.deployment["metadata"].get("annotations") or {}
    previous = annotations.get(PREVIOUS) if annotations.get(ADAPTER) == w.name else current
    return {"metadata": {"annotations": {PREVIOUS: previous, ADAPTER: w.name}},
            "spec": {"progressDeadlineSeconds": w.progress_deadline_seconds,
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {
                         "maxUnavailable": w.max_unavailable, "maxSurge": 1}},
                     "template": {"spec": {"containers": _with_container(w.deployment, index,
                                                                         model)}}}}


def rollout_failure(dep: dict, pods: list[dict], container: str, model: str) -> str | None:
    """Why the rollout of `model` failed, or None: the progress deadline passed, or a pod
    running `model` crash-loops (pods still on the old model do not count)."""
    failure = None
    progressing = {c["type"]: c for c in (dep.get("status") or {}).get("conditions") or []} \
        .get("Progressing") or {}
    if progressing.get("reason") == "ProgressDeadlineExceeded":
        failure = f"progress deadline exceeded: {progressing.get('message', '')}"
    for pod in pods:
        if (pod.get("models") or {}).get(container, "\0") != model:
            continue
        for st in pod.get("statuses") or []:
            if st.get("name") not in (None, container):
                continue
            if st.get("restartCount", 0) >= CRASH_RESTARTS or \
                    st.get("waiting") == "CrashLoopBackOff":
                failure = (f"pod {pod['metadata']['name']} crash-loops with the merged model "
                           f"({st.get('restartCount')} restarts; last exit "
                           f"{st.get('exitCode')}: {(st.get('message') or '').strip()[-300:]})")
    return failure


def _watch(w: MergedWorld, index: int, model: str, where: dict) -> MergedPlan:
    dep = w.deployment
    meta, status = dep["metadata"], dep.get("status") or {}
    revision = (meta.get("annotations") or {}).get("deployment.kubernetes.io/revision")
    where = {**where, "revision": f"{meta['name']}@{revision}" if revision else None}
    container = dep["spec"]["template"]["spec"]["containers"][index]["name"]
    failure = rollout_failure(dep, w.pods, container, model)
    if failure:
        return _rollback(w, index, model, failure, where)
    replicas = dep["spec"].get("replicas", 1)
    done = status.get("observedGeneration", 0) >= meta.get("generation", 0) and \
        status.get("updatedReplicas", 0) == replicas and \
        status.get("availableReplicas", 0) == replicas and \
        status.get("replicas", 0) == replicas
    if done:
        return MergedPlan(_state("RolledOut", "RolledOut",
                                 f"deployment {meta['name']} serves {model} on "
                                 f"{replicas}/{replicas} replicas (revision {revision})", **where))
    return MergedPlan(_state("RollingOut", "RollingOut",
                             f"{status.get('updatedReplicas', 0)}/{replicas} updated, "
                             f"{status.get('availableReplicas', 0)} available", **where),
                      active=True)


def _rollback(w: MergedWorld, index: int, model: str, failure: str, where: dict) -> MergedPlan:
    previous = (w.deployment["metadata"].get("annotations") or {}).get(PREVIOUS)
    if not w.rollback_on_failure or not previous:
        return MergedPlan(_state("Failed", "RolloutFailed", failure + (
            "" if previous else "; no previous model to restore"), **where))
    patch = {"metadata": {"annotations": {ROLLED_BACK: model, ROLLBACK_REASON: failure[:1000]}},
             "spec": {"template": {"spec": {"containers": _with_container(
                 w.deployment, index, previous)}}}}
    return MergedPlan(_state("Failed", "RolledBack", f"rollout of {model} failed ({failure}); "
                             f"rolled back to {previous}", **where), patch=patch)


def _restore(w: MergedWorld) -> MergedPlan:
    """The adapter is deleted (a Git revert): give the Deployment its previous model."""
    dep = w.deployment
    if dep is None:
        return MergedPlan(finalized=True)
    annotations = dep["metadata"].get("annotations") or {}
    if annotations.get(ADAPTER) != w.name:
        return MergedPlan(finalized=True)
    previous = annotations.get(PREVIOUS)
    patch: dict = {"metadata": {"annotations": {ADAPTER: None, PREVIOUS: None,
                                                ROLLED_BACK: None, ROLLBACK_REASON: None}}}
    index = container_index(dep, w.container)
    if previous and index is not None and \
            model_of(dep["spec"]["template"]["spec"]["containers"][index]) != previous:
        patch["spec"] = {"template": {"spec": {"containers": _with_container(dep, index,
                                                                             previous)}}}
    return MergedPlan(patch=patch, finalized=True, events=[
        ("Normal", "Restored", f"deployment {dep['metadata']['name']} back to {previous}")])
