"""kopf-facing handlers: they only refresh caches and queue keys, so they run on kopf's event
loop (``async``, no API call, nothing that waits) instead of a hop to its thread pool per
event and handler (a pod event reaches two)."""

from __future__ import annotations

import pickle

import kopf


def snapshot(body) -> dict:
    """A private copy of a watch event's object (JSON types only): the caches keep it and our
    own writes update it, never kopf's. A pickle round trip copies such a tree 4x faster than
    copy.deepcopy (measured: 86 vs 355 us for a training pod). FineTuneJobs, LoRAAdapters,
    Deployments and merge Jobs pass here; training Jobs and pods, the most events, are kept
    as views instead (cache.job_view, cache.trainer_pod_view)."""
    return pickle.loads(pickle.dumps(dict(body), pickle.HIGHEST_PROTOCOL))


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf's diff base is what its change handlers (on.create/update/delete) compare with;
    every handler here watches events only, so it is never read. kopf builds it on every event
    all the same: a deep copy of the object (and of its annotations, a training pod's trainer
    config among them), then a diff: the event loop's CPU in a burst of 500 jobs went from
    24.1 s to 21.1 s without it. Nothing is built, fetched or stored;
    `registered_only_event_handlers` guards the assumption."""

    def build(self, *, body, extra_fields=None):
        return {}

    def fetch(self, *, body):
        return None

    def store(self, *, body, patch, essence):
        return None


def registered_only_event_handlers(registry: kopf.OperatorRegistry) -> bool:
    """True when no handler needs kopf's diff base (see NoDiffBase)."""
    return not (registry._changing.get_all_handlers() or registry._spawning.get_all_handlers())
