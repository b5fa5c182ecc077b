"""kopf-facing handlers for LoRAAdapters, the Deployments they target, merge Jobs and pods:
thin, level-based. Events refresh the controller's caches and queue the adapters concerned."""

from __future__ import annotations

import kopf

from ..adapters import LoRAAdapterController
from ..policy import TARGET_LABEL
from ..resources.finetunejob import LABEL_JOB
from ..resources.loraadapter import LABEL_ADAPTER
from . import snapshot


def register(registry: kopf.OperatorRegistry, controller: LoRAAdapterController) -> None:
    @kopf.on.event("kubetune.io", "v1alpha1", "loraadapters", registry=registry)
    async def adapter_event(type, body, **_):  # noqa: A002 - kopf's keyword
        controller.on_adapter(type or "ADDED", snapshot(body))

    # Only Deployments an adapter may change are watched when the policy requires opting in.
    opted_in = {TARGET_LABEL: "true"} if controller.settings.require_target_opt_in else None

    @kopf.on.event("apps", "v1", "deployments", labels=opted_in, registry=registry)
    async def deployment_event(type, body, **_):  # noqa: A002
        controller.on_deployment(type or "ADDED", snapshot(body))

    @kopf.on.event("batch", "v1", "jobs", labels={LABEL_ADAPTER: kopf.PRESENT},
                   registry=registry)
    async def merge_job_event(type, body, **_):  # noqa: A002
        controller.on_merge_job(type or "ADDED", snapshot(body))

    # Training pods (half of a burst's events) are never serving pods: kopf skips this
    # handler for them rather than calling it to return at once.
    @kopf.on.event("", "v1", "pods", labels={LABEL_JOB: kopf.ABSENT}, registry=registry)
    async def serving_pod_event(type, body, **_):  # noqa: A002
        controller.on_pod(type or "ADDED", dict(body))
