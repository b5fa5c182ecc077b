"""Merged mode, I/O: observe what the pure plan (reconcile/merged.py) needs from the caches
(the target Deployment, its pods, the merge Job and its pods) and S3 (the merged model's
manifest), then apply the plan: create the merge Job, patch the Deployment, send the Events.

No API read on the way: the Deployment, Jobs and pods come from the watches; a merged model
that S3 says is ready for a digest is remembered (it is immutable once its manifest names it)."""

from __future__ import annotations

import json
import threading

import structlog

from kubetune.artifacts import MANIFEST, MAX_MANIFEST_BYTES
from kubetune.storage import StorageError, join

from . import policy
from .cache import ServingCache
from .kube import Kube
from .reconcile import merged as rec
from .resources.loraadapter import merge_job, merge_job_name
from .settings import OperatorSettings

log = structlog.get_logger("kubetune.operator")


class MergedRollout:
    def __init__(self, kube: Kube, settings: OperatorSettings, serving: ServingCache):
        self.kube = kube
        self.settings = settings
        self.serving = serving
        self._ready: set[tuple[str, str]] = set()  # (merged uri, adapter digest) seen in S3
        self._lock = threading.Lock()

    def observe(self, body: dict, adapter, v, decision, deleting: bool, deployment: dict | None,
                storage=None, rivals: frozenset[str] = frozenset()) -> rec.MergedWorld:
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        target = adapter.spec.target
        rollout = adapter.spec.rollout
        world = rec.MergedWorld(
            name, ns, target.deployment, v, decision, deleting, deployment,
            opted_in=deployment is None or policy.target_opted_in(deployment, self.settings),
            container=target.container, rollback_on_failure=rollout.rollback_on_failure,
            progress_deadline_seconds=rollout.progress_deadline_seconds,
            max_unavailable=rollout.max_unavailable, rivals=rivals)
        if deleting or not v.ok or deployment is None:
            return world
        world.merged_ready = self._merged_ready(storage, rec.merged_uri(v.uri), v.digest)
        world.merge_job_name = merge_job_name(name, v.digest)
        if not world.merged_ready:
            world.merge_job = self.serving.job(ns, world.merge_job_name)
            world.merge_pods = self.serving.pods(ns, {"job-name": world.merge_job_name})
        selector = ((deployment.get("spec") or {}).get("selector") or {}).get("matchLabels")
        world.pods = self.serving.pods(ns, selector or {})
        return world

    def act(self, body: dict, adapter, v, world: rec.MergedWorld, plan: rec.MergedPlan) -> None:
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        if plan.create_merge_job:
            job = merge_job(body, adapter, v.digest, v.uri, rec.merged_uri(v.uri),
                            self.settings)
            self.kube.create(job)
            self.serving.put_job(job)  # write-through: its watch event follows
        if plan.patch is not None and world.deployment is not None:
            self.kube.patch(world.deployment, plan.patch)
            log.info("Patched the target Deployment", namespace=ns, adapter=name,
                     deployment=world.deployment["metadata"]["name"],
                     phase=plan.state.get("phase"), reason=plan.state.get("reason"))
        for kind, reason, message in plan.events:
            self.kube.event(body, kind, reason, message)

    def forget(self, uri: str | None) -> None:
        """An adapter is gone: its merged model is read from S3 again if it comes back."""
        with self._lock:
            self._ready = {k for k in self._ready if k[0] != rec.merged_uri(uri or "")}

    def _merged_ready(self, storage, uri: str, digest: str) -> bool:
        with self._lock:
            if (uri, digest) in self._ready:
                return True
        if storage is None:
            return False
        try:
            manifest = json.loads(storage.get_bytes(join(uri, MANIFEST),
                                                    limit=MAX_MANIFEST_BYTES))
        except (StorageError, ValueError):
            return False
        ok = isinstance(manifest, dict) and manifest.get("adapterSha256") == digest
        if ok:
            with self._lock:
                self._ready.add((uri, digest))
        return ok
