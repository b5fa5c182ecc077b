"""kopf-facing handlers for FineTuneJobs and their children: thin, level-based. Every event
(of the job, its Jobs or its Pods) refreshes the cache and runs the one reconcile."""

from __future__ import annotations

import kopf

from ..cache import job_view, trainer_pod_view
from ..controller import FineTuneJobController
from ..resources.finetunejob import LABEL_JOB
from . import snapshot


def register(registry: kopf.OperatorRegistry, controller: FineTuneJobController) -> None:
    caches = controller.caches

    @kopf.on.event("kubetune.io", "v1alpha1", "finetunejobs", registry=registry)
    async def finetunejob_event(type, body, **_):  # noqa: A002 - kopf's keyword
        controller.on_finetunejob(type or "ADDED", snapshot(body))

    @kopf.on.event("batch", "v1", "jobs", labels={LABEL_JOB: kopf.PRESENT}, registry=registry)
    async def job_event(type, body, **_):  # noqa: A002
        # A view (new dicts at its top; what it keeps of the event is never written to):
        # no copy of the whole object (the copies were a quarter of the event loop's CPU).
        controller.on_child(caches.jobs, type or "ADDED", job_view(body))

    @kopf.on.event("", "v1", "pods", labels={LABEL_JOB: kopf.PRESENT}, registry=registry)
    async def pod_event(type, body, **_):  # noqa: A002
        controller.on_child(caches.pods, type or "ADDED", trainer_pod_view(body))
