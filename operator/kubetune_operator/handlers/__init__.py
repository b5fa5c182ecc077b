"""kopf-facing handlers: they only refresh caches and queue keys, so they run on kopf's event
loop (``async``, no API call, nothing that waits) instead of a hop to its thread pool per
event and handler (a pod event reaches two)."""

from __future__ import annotations

import pickle


def snapshot(body) -> dict:
    """A private copy of a watch event's object (JSON types only): the caches keep it and our
    own writes update it, never kopf's. A pickle round trip copies such a tree 4x faster than
    copy.deepcopy (measured: 86 vs 355 us for a training pod), and every pod, Job and
    FineTuneJob event passes here."""
    return pickle.loads(pickle.dumps(dict(body), pickle.HIGHEST_PROTOCOL))
