"""kopf-facing handlers for LoRAAdapters and the serving pods they target: thin, level-based.
An adapter event or a change of one of its target's pods queues that adapter's reconcile."""

from __future__ import annotations

import copy

import kopf

from ..adapters import LoRAAdapterController


def register(registry: kopf.OperatorRegistry, controller: LoRAAdapterController) -> None:
    @kopf.on.event("kubetune.io", "v1alpha1", "loraadapters", registry=registry)
    def adapter_event(type, body, **_):  # noqa: A002 - kopf's keyword
        controller.on_adapter(type or "ADDED", copy.deepcopy(dict(body)))

    @kopf.on.event("", "v1", "pods", registry=registry)
    def serving_pod_event(type, body, **_):  # noqa: A002
        controller.on_pod(type or "ADDED", dict(body))
