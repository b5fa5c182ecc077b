"""In-memory view of the watched objects (an informer cache): filled by a LIST at start-up and
kept fresh by watch events, so reconciles read children without API calls."""

from __future__ import annotations

import threading
from collections import defaultdict

from .reconcile.merged import model_of

Key = tuple[str, str]  # (namespace, name of the owning FineTuneJob)


class Store:
    def __init__(self):
        self._lock = threading.Lock()
        self._by_owner: dict[Key, dict[str, dict]] = defaultdict(dict)

    def put(self, owner: Key, obj: dict) -> None:
        with self._lock:
            name = obj["metadata"]["name"]
            current = self._by_owner[owner].get(name)
            if current and _rv(current) > _rv(obj):
                return  # an older event than what we hold
            self._by_owner[owner][name] = obj

    def remove(self, owner: Key, name: str) -> None:
        with self._lock:
            self._by_owner.get(owner, {}).pop(name, None)

    def children(self, owner: Key) -> list[dict]:
        with self._lock:
            return list(self._by_owner.get(owner, {}).values())

    def forget(self, owner: Key) -> None:
        with self._lock:
            self._by_owner.pop(owner, None)


def _rv(obj: dict) -> int:
    try:
        return int(obj["metadata"].get("resourceVersion") or 0)
    except ValueError:
        return 0


# What a FineTuneJob's reconcile reads of its Jobs and pods (reconcile/finetunejob.py: classify,
# observe_attempts, _stale, _suspension; controller.py: ownership, Kueue): identity, labels,
# owners, a Job's suspend and spec-generation annotation, a pod's node, and status.
_CHILD_META = ("name", "namespace", "uid", "resourceVersion", "creationTimestamp",
               "deletionTimestamp", "labels", "ownerReferences")


def job_view(job: dict) -> dict:
    """A training Job as its FineTuneJob's cache keeps it: without its pod template (the
    trainer config among it) and managedFields, a tenth of its objects. Every cached object
    is one the garbage collector walks (see gctuning) and a share of the operator's RSS."""
    meta, spec = job["metadata"], job.get("spec") or {}
    view = {k: meta[k] for k in _CHILD_META if k in meta}
    if meta.get("annotations"):
        view["annotations"] = meta["annotations"]  # the spec generation it was built from
    return {"apiVersion": job.get("apiVersion", "batch/v1"), "kind": job.get("kind", "Job"),
            "metadata": view, "spec": {k: spec[k] for k in ("suspend",) if k in spec},
            "status": job.get("status") or {}}


def trainer_pod_view(pod: dict) -> dict:
    """A training pod as its FineTuneJob's cache keeps it: identity, owners, node and status
    (phase, conditions, container states and the trainer's termination message); not its
    spec, annotations (the trainer config) or managedFields."""
    meta = pod["metadata"]
    return {"apiVersion": pod.get("apiVersion", "v1"), "kind": pod.get("kind", "Pod"),
            "metadata": {k: meta[k] for k in _CHILD_META if k in meta},
            "spec": {"nodeName": (pod.get("spec") or {}).get("nodeName")},
            "status": pod.get("status") or {}}


class Caches:
    def __init__(self):
        self.finetunejobs: dict[Key, dict] = {}
        self.jobs = Store()
        self.pods = Store()
        self.lock = threading.Lock()


def pod_view(pod: dict) -> dict:
    """What the adapter controller needs of a pod, kept small: every pod in the watched
    namespaces passes through this cache (serving pods carry no label of ours). Besides
    readiness and IP: the model each container serves and each container's restarts and last
    exit (a merged rollout's crash loops), and why it cannot be scheduled (a merge Job's)."""
    status = pod.get("status") or {}
    ready = not pod["metadata"].get("deletionTimestamp") and status.get("phase") == "Running" \
        and bool(status.get("podIP")) and any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or [])
    statuses = []
    for st in status.get("containerStatuses") or []:
        state, last = st.get("state") or {}, st.get("lastState") or {}
        term = last.get("terminated") or state.get("terminated") or {}
        statuses.append({"name": st.get("name"), "restartCount": st.get("restartCount", 0),
                         "waiting": (state.get("waiting") or {}).get("reason"),
                         "exitCode": term.get("exitCode"),
                         "message": (term.get("message") or "")[-1000:] or None})
    unschedulable = next((c.get("message", "") for c in status.get("conditions") or []
                          if c.get("type") == "PodScheduled" and
                          c.get("reason") == "Unschedulable"), None)
    return {"metadata": {"name": pod["metadata"]["name"],
                         "namespace": pod["metadata"]["namespace"],
                         "labels": dict(pod["metadata"].get("labels") or {}),
                         "resourceVersion": pod["metadata"].get("resourceVersion")},
            "status": {"podIP": status.get("podIP")}, "ready": bool(ready),
            "models": {c["name"]: model_of(c)
                       for c in (pod.get("spec") or {}).get("containers") or []},
            "statuses": statuses, "unschedulable": unschedulable}


class ServingCache:
    """Deployments that adapters may target (the watch is filtered to opted-in ones when the
    policy requires it), merge Jobs and every pod's small view, by namespace: the adapter
    reconcile reads them without an API call; LIST primes them, watch events keep them fresh."""

    def __init__(self):
        self._lock = threading.Lock()
        self.deployments: dict[Key, dict] = {}
        self.jobs: dict[Key, dict] = {}
        self._pods: dict[str, dict[str, dict]] = defaultdict(dict)

    def _put(self, table: dict[Key, dict], obj: dict) -> None:
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        with self._lock:
            current = table.get(key)
            if current is None or _rv(current) <= _rv(obj):
                table[key] = obj  # never an older event over what we hold

    def _get(self, table: dict[Key, dict], ns: str, name: str, remove: bool = False):
        with self._lock:
            return table.pop((ns, name), None) if remove else table.get((ns, name))

    def put_deployment(self, obj: dict) -> None:
        self._put(self.deployments, obj)

    def remove_deployment(self, ns: str, name: str) -> None:
        self._get(self.deployments, ns, name, remove=True)

    def deployment(self, ns: str, name: str) -> dict | None:
        return self._get(self.deployments, ns, name)

    def put_pod(self, pod: dict) -> None:
        view = pod_view(pod)
        ns, name = view["metadata"]["namespace"], view["metadata"]["name"]
        with self._lock:
            current = self._pods[ns].get(name)
            if current is None or _rv(current) <= _rv(view):
                self._pods[ns][name] = view

    def remove_pod(self, ns: str, name: str) -> None:
        with self._lock:
            self._pods.get(ns, {}).pop(name, None)

    def pods(self, ns: str, selector: dict[str, str]) -> list[dict]:
        """Pods of `ns` whose labels match `selector`, ready or not (an empty selector matches
        none: a Deployment always has one)."""
        if not selector:
            return []
        with self._lock:
            pods = list(self._pods.get(ns, {}).values())
        return sorted((p for p in pods if all(
            p["metadata"]["labels"].get(k) == v for k, v in selector.items())),
            key=lambda p: p["metadata"]["name"])

    def ready_pods(self, ns: str, selector: dict[str, str]) -> list[dict]:
        return [p for p in self.pods(ns, selector) if p["ready"]]

    def put_job(self, job: dict) -> None:
        """A merge Job (the watch is filtered to Jobs labelled with their LoRAAdapter)."""
        self._put(self.jobs, job)

    def remove_job(self, ns: str, name: str) -> None:
        self._get(self.jobs, ns, name, remove=True)

    def job(self, ns: str, name: str) -> dict | None:
        return self._get(self.jobs, ns, name)

    def pod_count(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._pods.values())
