"""The operator's garbage collector settings.

The operator holds every watched Job, pod and FineTuneJob as plain JSON trees: a few hundred
thousand dicts and lists at 500 jobs, none in a reference cycle (reference counting frees
them). CPython's cycle collector, with its default thresholds (700, 10, 10), walked all of
them again and again while a burst of jobs grew the caches: measured in
`bench/operator_scale.py --jobs 500`, 1,695 collections took 3.8 s of the operator's 10.2 s of
CPU, 2.6 s of it in 12 full collections over ~300k objects. That time showed up as JSON
decoding of watch events (the allocations that triggered it).

So: what start-up made (modules, kopf, pydantic schemas, the primed caches) is frozen, never
scanned again; young objects are collected after 20,000 allocations instead of 700 (most of a
watch event's objects are freed by reference counting before then, and never scanned); a
full collection waits for 50 middle ones (about 20 million allocations). Cycles still go:
young ones within the next young collection, older ones at the next full one.
"""

from __future__ import annotations

import gc

THRESHOLDS = (20_000, 20, 50)  # young, middle, full (CPython's default: 700, 10, 10)


def tune() -> None:
    """Freeze what exists now and raise the thresholds (call once, after start-up)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
