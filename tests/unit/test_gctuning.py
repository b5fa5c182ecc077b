"""The operator's collector settings (operator/kubetune_operator/gctuning.py): start-up is
frozen and young objects wait for 20,000 allocations, so a burst of watch events no longer
spends a third of the operator's CPU walking its caches."""

import gc

import pytest

from kubetune_operator import gctuning

pytestmark = pytest.mark.unit


def test_tune_freezes_what_exists_and_raises_the_thresholds():
    before = gc.get_threshold()
    try:
        kept = [{"cached": i} for i in range(1000)]  # what start-up primed
        gctuning.tune()
        assert gc.get_threshold() == gctuning.THRESHOLDS
        assert gctuning.THRESHOLDS[0] >= 10 * before[0]
        assert gc.get_freeze_count() >= len(kept)
        # Cycles made after it are still collected.
        loop = []
        loop.append(loop)
        del loop
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
