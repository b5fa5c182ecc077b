"""Merged mode: merge Job (trainer image) → merged model in S3 (with a manifest naming the
adapter digest) → the target Deployment's model switched to it (a new revision) → the rollout
watched → on failure (progress deadline, crash loops) the previous model restored.

What was done is read back from the world: the merged model's manifest in S3, the merge Job,
the Deployment's model argument and its annotations (`kubetune.io/previous-model`,
`kubetune.io/merged-adapter`, `kubetune.io/rolled-back-model`)."""

from __future__ import annotations

import json

import structlog

from kubetune.artifacts import MANIFEST, MAX_MANIFEST_BYTES
from kubetune.storage import StorageError, join

from . import policy
from .kube import Kube
from .resources.loraadapter import merge_job, merge_job_name
from .settings import OperatorSettings

log = structlog.get_logger("kubetune.operator")
PREVIOUS = "kubetune.io/previous-model"
ADAPTER = "kubetune.io/merged-adapter"
ROLLED_BACK = "kubetune.io/rolled-back-model"
CRASH_RESTARTS = 2


def merged_uri(adapter_uri: str) -> str:
    return adapter_uri.rstrip("/") + "-merged"


def _container(deployment: dict, name: str | None) -> tuple[int, dict]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    for i, c in enumerate(containers):
        if name is None or c["name"] == name:
            return i, c
    raise KeyError(f"container {name} not found in deployment "
                   f"{deployment['metadata']['name']}")


def model_of(container: dict) -> str | None:
    """The served model: `--model X` / `--model=X` in command+args, else $KUBETUNE_MODEL."""
    argv = (container.get("command") or []) + (container.get("args") or [])
    for i, part in enumerate(argv):
        if part == "--model" and i + 1 < len(argv):
            return argv[i + 1]
        if part.startswith("--model="):
            return part.split("=", 1)[1]
    return next((e.get("value") for e in container.get("env") or []
                 if e["name"] == "KUBETUNE_MODEL"), None)


def with_model(container: dict, model: str) -> dict:
    """The container patched to serve `model` (same place the model was named)."""
    out = json.loads(json.dumps(container))
    for field in ("command", "args"):
        parts = out.get(field) or []
        for i, part in enumerate(parts):
            if part == "--model" and i + 1 < len(parts):
                parts[i + 1] = model
                return out
            if part.startswith("--model="):
                parts[i] = f"--model={model}"
                return out
    env = [e for e in out.get("env") or [] if e["name"] != "KUBETUNE_MODEL"]
    out["env"] = [*env, {"name": "KUBETUNE_MODEL", "value": model}]
    return out


class MergedRollout:
    def __init__(self, kube: Kube, settings: OperatorSettings):
        self.kube = kube
        self.settings = settings

    def reconcile(self, body: dict, adapter, v, decision, deleting: bool,
                  storage=None, rivals: frozenset[str] = frozenset()) -> dict:
        """`decision` (from the alias group): only the version that should serve switches
        the Deployment; the others leave it alone. `rivals`: the other live adapters on the
        same Deployment outside this alias group; one of them holding it blocks this one (a
        Deployment serves one merged model; two would take turns rolling it forever)."""
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        target = adapter.spec.target
        deployment = self.kube.get_deployment(ns, target.deployment)
        if deleting:
            return self._restore(body, deployment, adapter)
        if not v.ok:
            return {"phase": "Pending", "reason": "ArtifactNotVerified", "message": ""}
        out_uri = merged_uri(v.uri)
        state = {"uri": out_uri}
        if deployment is None:
            return {**state, "phase": "Failed", "reason": "TargetNotFound",
                    "message": f"deployment {target.deployment} not found in {ns}"}
        if not policy.target_opted_in(deployment, self.settings):
            return {**state, "phase": "Failed", "reason": "TargetNotOptedIn",
                    "message": policy.not_opted_in_message(target.deployment, ns)}
        if decision.want != "load":
            phase = "Superseded" if decision.reason == "Superseded" else "Pending"
            reason = decision.reason if decision.reason != "NotPromoted" else "PromotionPending"
            return {**state, "phase": phase, "reason": reason, "message": decision.message}
        holder = (deployment["metadata"].get("annotations") or {}).get(ADAPTER)
        if holder in rivals:
            return {**state, "phase": "Failed", "reason": "TargetInUse",
                    "message": f"deployment {target.deployment} already serves the merged "
                               f"adapter {holder} (not a version of this alias); a Deployment "
                               f"serves one merged model: delete {holder} or target another "
                               f"Deployment"}
        if not self._merged_ready(storage, out_uri, v.digest):
            return {**state, **self._merge(body, adapter, v, out_uri)}
        annotations = deployment["metadata"].get("annotations") or {}
        if annotations.get(ROLLED_BACK) == out_uri:
            return {**state, "phase": "Failed", "reason": "RolledBack",
                    "message": f"the rollout of {out_uri} failed and was rolled back to "
                               f"{annotations.get(PREVIOUS)}; apply a new adapter version "
                               f"to try again"}
        index, container = _container(deployment, target.container)
        current = model_of(container)
        if current != out_uri:
            self._switch(deployment, index, container, out_uri, annotations, name, current,
                         adapter.spec.rollout)
            return {**state, "phase": "RollingOut", "reason": "RollingOut",
                    "message": f"deployment {target.deployment}: {current} -> {out_uri}"}
        return {**state, **self._watch(deployment, index, container, out_uri, adapter)}

    # ---- merge ---------------------------------------------------------------------------
    def _merged_ready(self, storage, uri: str, digest: str) -> bool:
        if storage is None:
            return False
        try:
            manifest = json.loads(storage.get_bytes(join(uri, MANIFEST),
                                                    limit=MAX_MANIFEST_BYTES))
        except (StorageError, ValueError):
            return False
        return isinstance(manifest, dict) and manifest.get("adapterSha256") == digest

    def _merge(self, body: dict, adapter, v, out_uri: str) -> dict:
        ns = body["metadata"]["namespace"]
        job = self.kube.get_job(ns, merge_job_name(body["metadata"]["name"], v.digest))
        if job is None:
            self.kube.create(merge_job(body, adapter, v.digest, v.uri, out_uri, self.settings))
            self.kube.event(body, "Normal", "Merging", f"Created merge Job "
                                                       f"{merge_job_name(body['metadata']['name'], v.digest)}"
                                                       f" -> {out_uri}")
            return {"phase": "Merging", "reason": "Merging", "message": "merge Job created"}
        conds = {c["type"]: c for c in (job.get("status") or {}).get("conditions") or []
                 if c.get("status") == "True"}
        if "Failed" in conds:
            message = conds["Failed"].get("message", "")
            pods = self.kube.pods(ns, {"job-name": job["metadata"]["name"]})
            for pod in pods:
                for st in (pod.get("status") or {}).get("containerStatuses") or []:
                    term = (st.get("state") or {}).get("terminated") or {}
                    if term.get("message"):
                        message = term["message"].strip().splitlines()[-1]
            return {"phase": "Failed", "reason": "MergeFailed",
                    "message": f"merge Job {job['metadata']['name']} failed: {message[:1000]}"}
        detail = "is running"
        for pod in self.kube.pods(ns, {"job-name": job["metadata"]["name"]}):
            for c in (pod.get("status") or {}).get("conditions") or []:
                if c.get("type") == "PodScheduled" and c.get("reason") == "Unschedulable":
                    detail = f"is unschedulable: {c.get('message', '')}"
        return {"phase": "Merging", "reason": "Merging",
                "message": f"merge Job {job['metadata']['name']} {detail}"}

    # ---- rollout -------------------------------------------------------------------------
    def _switch(self, deployment, index, container, model, annotations, name, current,
                rollout) -> None:
        patched = with_model(container, model)
        containers = list(deployment["spec"]["template"]["spec"]["containers"])
        containers[index] = patched
        previous = annotations.get(PREVIOUS) if annotations.get(ADAPTER) == name else current
        self.kube.patch(deployment, {
            "metadata": {"annotations": {PREVIOUS: previous, ADAPTER: name}},
            "spec": {"progressDeadlineSeconds": rollout.progress_deadline_seconds,
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {
                         "maxUnavailable": rollout.max_unavailable, "maxSurge": 1}},
                     "template": {"spec": {"containers": containers}}}})
        log.info("Rolling out merged model", deployment=deployment["metadata"]["name"],
                 model=model, previous=previous)

    def _watch(self, deployment, index, container, model, adapter) -> dict:
        meta, status = deployment["metadata"], deployment.get("status") or {}
        revision = (meta.get("annotations") or {}).get("deployment.kubernetes.io/revision")
        state = {"revision": f"{meta['name']}@{revision}" if revision else None}
        conds = {c["type"]: c for c in status.get("conditions") or []}
        progressing = conds.get("Progressing") or {}
        failure = None
        if progressing.get("reason") == "ProgressDeadlineExceeded":
            failure = f"progress deadline exceeded: {progressing.get('message', '')}"
        selector = (deployment["spec"].get("selector") or {}).get("matchLabels") or {}
        for pod in self.kube.pods(meta["namespace"], selector):
            spec_ctr = next((c for c in pod["spec"]["containers"]
                             if c["name"] == container["name"]), None)
            if spec_ctr is None or model_of(spec_ctr) != model:
                continue
            for st in (pod.get("status") or {}).get("containerStatuses") or []:
                waiting = (st.get("state") or {}).get("waiting") or {}
                last = (st.get("lastState") or {}).get("terminated") or \
                    (st.get("state") or {}).get("terminated") or {}
                if st.get("restartCount", 0) >= CRASH_RESTARTS or \
                        waiting.get("reason") == "CrashLoopBackOff":
                    failure = (f"pod {pod['metadata']['name']} crash-loops with the merged "
                               f"model ({st.get('restartCount')} restarts; last exit "
                               f"{last.get('exitCode')}: "
                               f"{(last.get('message') or '').strip()[-300:]})")
        if failure:
            return {**state, **self._rollback(deployment, index, container, model, adapter,
                                              failure)}
        replicas = deployment["spec"].get("replicas", 1)
        done = status.get("observedGeneration", 0) >= meta.get("generation", 0) and \
            status.get("updatedReplicas", 0) == replicas and \
            status.get("availableReplicas", 0) == replicas and \
            status.get("replicas", 0) == replicas
        if done:
            return {**state, "phase": "RolledOut", "reason": "RolledOut",
                    "message": f"deployment {meta['name']} serves {model} on "
                               f"{replicas}/{replicas} replicas (revision {revision})"}
        return {**state, "phase": "RollingOut", "reason": "RollingOut",
                "message": f"{status.get('updatedReplicas', 0)}/{replicas} updated, "
                           f"{status.get('availableReplicas', 0)} available"}

    def _rollback(self, deployment, index, container, model, adapter, failure) -> dict:
        annotations = deployment["metadata"].get("annotations") or {}
        previous = annotations.get(PREVIOUS)
        if not adapter.spec.rollout.rollback_on_failure or not previous:
            return {"phase": "Failed", "reason": "RolloutFailed",
                    "message": failure + ("" if previous else "; no previous model to restore")}
        containers = list(deployment["spec"]["template"]["spec"]["containers"])
        containers[index] = with_model(container, previous)
        self.kube.patch(deployment, {"metadata": {"annotations": {ROLLED_BACK: model}},
                                     "spec": {"template": {"spec": {"containers": containers}}}})
        log.warning("Rolled back merged model", deployment=deployment["metadata"]["name"],
                    model=model, previous=previous, failure=failure)
        return {"phase": "Failed", "reason": "RolledBack",
                "message": f"rollout of {model} failed ({failure}); rolled back to {previous}"}

    def _restore(self, body: dict, deployment: dict | None, adapter) -> dict:
        """The adapter is deleted (a Git revert): give the Deployment its previous model."""
        if deployment is None:
            return {"finalized": True}
        annotations = deployment["metadata"].get("annotations") or {}
        if annotations.get(ADAPTER) != body["metadata"]["name"]:
            return {"finalized": True}
        index, container = _container(deployment, adapter.spec.target.container)
        previous = annotations.get(PREVIOUS)
        patch: dict = {"metadata": {"annotations": {ADAPTER: None, PREVIOUS: None,
                                                    ROLLED_BACK: None}}}
        if previous and model_of(container) != previous:
            containers = list(deployment["spec"]["template"]["spec"]["containers"])
            containers[index] = with_model(container, previous)
            patch["spec"] = {"template": {"spec": {"containers": containers}}}
        self.kube.patch(deployment, patch)
        self.kube.event(body, "Normal", "Restored", f"deployment {deployment['metadata']['name']}"
                                                    f" back to {previous}")
        return {"finalized": True}
