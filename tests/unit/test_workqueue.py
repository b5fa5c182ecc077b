"""The LoRAAdapter work queue: fair between namespaces, one run per key at a time.

A tenant's serving pods may answer a load only after minutes (engineLoadTimeoutSeconds): these
tests hold handlers of one namespace on an Event and check that another namespace's key still
runs, and that the held namespace never has more than its share of the workers."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import REGISTRY

from kubetune_operator.adapters import LoRAAdapterController
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.workqueue import WorkQueue

pytestmark = pytest.mark.unit


class Recorder:
    def __init__(self, hold_lane: str):
        self.hold_lane = hold_lane
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.done: list = []
        self.started = threading.Condition(self.lock)

    def __call__(self, key):
        lane = key[0]
        with self.lock:
            self.running[lane] = self.running.get(lane, 0) + 1
            self.peak[lane] = max(self.peak.get(lane, 0), self.running[lane])
            self.started.notify_all()
        try:
            if lane == self.hold_lane:
                assert self.release.wait(30), "never released"
        finally:
            with self.lock:
                self.running[lane] -= 1
                self.done.append(key)
                self.started.notify_all()

    def wait_for(self, predicate, timeout=10.0) -> bool:
        with self.lock:
            return self.started.wait_for(predicate, timeout)


def test_a_slow_namespace_holds_only_its_share_and_another_namespace_still_runs():
    rec = Recorder("hostile")
    queue = WorkQueue(rec, workers=4, per_lane=2)
    queue.start()
    try:
        for i in range(10):
            queue.add(("hostile", f"a{i}"))
        assert rec.wait_for(lambda: rec.running.get("hostile") == 2)
        queue.add(("tenant-b", "adapter"))
        # Runs while all ten hostile keys are still held (with one pool of 4 workers shared
        # first-come first-served, it would wait for the hostile loads to time out).
        assert rec.wait_for(lambda: ("tenant-b", "adapter") in rec.done), rec.running
        assert rec.peak["hostile"] == 2
        assert queue.depth() == 8  # the held namespace's other keys wait their turn
    finally:
        rec.release.set()
    assert rec.wait_for(lambda: len(rec.done) == 11)
    assert rec.peak["hostile"] == 2  # never more than its share, even once released
    queue.stop()


def test_free_workers_go_to_namespaces_in_turn():
    order: list = []
    gate, first, all_done = threading.Event(), threading.Event(), threading.Event()

    def handler(key):
        if key == ("blocker", "x"):
            first.set()
            assert gate.wait(10)
            return
        order.append(key[0])
        if len(order) == 4:
            all_done.set()

    queue = WorkQueue(handler, workers=1, per_lane=1)
    queue.start()
    queue.add(("blocker", "x"))
    assert first.wait(10)
    for i in range(3):
        queue.add(("busy", f"k{i}"))
    queue.add(("quiet", "k"))
    gate.set()
    assert all_done.wait(10), order
    queue.stop()
    # The quiet namespace's only key ran second, not after all of the busy one's keys.
    assert order == ["busy", "quiet", "busy", "busy"]


def test_a_key_added_while_it_runs_runs_once_more_and_never_twice_at_once():
    inside, gate, second = threading.Event(), threading.Event(), threading.Event()
    runs: list[int] = []
    concurrent = {"now": 0, "max": 0}
    lock = threading.Lock()

    def handler(key):
        with lock:
            concurrent["now"] += 1
            concurrent["max"] = max(concurrent["max"], concurrent["now"])
        runs.append(1)
        if len(runs) == 1:
            inside.set()
            assert gate.wait(10)
        with lock:
            concurrent["now"] -= 1
        if len(runs) == 2:
            second.set()

    queue = WorkQueue(handler, workers=4, per_lane=4)
    queue.start()
    queue.add(("ns", "a"))
    assert inside.wait(10)
    for _ in range(5):
        queue.add(("ns", "a"))  # a burst while running collapses into one more run
    gate.set()
    assert second.wait(10)
    queue.stop()
    assert len(runs) == 2 and concurrent["max"] == 1


def test_the_adapter_controller_is_fair_by_namespace_with_the_configured_shares():
    settings = OperatorSettings(adapter_workers=8, adapter_workers_per_namespace=3)
    controller = LoRAAdapterController(None, settings)
    assert (controller.queue.workers, controller.queue.per_lane) == (8, 3)
    assert controller.queue.lane_of(("team-a", "adapter")) == "team-a"
    # keys waiting for a worker are visible on /metrics (a stopped queue starts none)
    controller.queue.stop()
    for key in (("team-a", "x"), ("team-b", "y"), ("team-a", "x")):
        controller.queue.add(key)
    assert REGISTRY.get_sample_value("kubetune_adapter_queue_waiting") == 2
    with pytest.raises(ValueError):
        WorkQueue(lambda key: None, workers=0)


def test_failures_back_off_exponentially_with_jitter_and_success_resets():
    import time

    calls: list[float] = []
    fail = {"on": True}

    def handler(key):
        calls.append(time.monotonic())
        if fail["on"]:
            raise RuntimeError("apiserver hiccup")

    q = WorkQueue(handler, workers=2, per_lane=2, backoff=(0.05, 0.4))
    q.start()
    try:
        q.add(("ns", "a"))
        deadline = time.monotonic() + 10
        while len(calls) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        gaps = [b - a for a, b in zip(calls, calls[1:])]
        # 0.05, 0.1, 0.2, 0.4, 0.4 (capped), each ±20 %
        for gap, want in zip(gaps, (0.05, 0.1, 0.2, 0.4, 0.4)):
            assert want * 0.8 - 0.01 <= gap <= want * 1.2 + 0.15, gaps
        assert q._failures[("ns", "a")] >= 5
        q.forget(("ns", "a"))
        assert ("ns", "a") not in q._failures
        delays = [q.retry(("ns", f"k{i}")) for i in range(20)]  # each a first failure
        assert all(0.04 <= d <= 0.06 for d in delays)
        assert len({round(d, 6) for d in delays}) > 10  # jittered, not in lockstep
    finally:
        fail["on"] = False
        q.stop()


def test_the_finetunejob_controller_reconciles_off_kopfs_threads():
    """An event only queues the key: the handler returns at once, a worker reconciles."""
    from kubetune_operator.cache import Caches
    from kubetune_operator.controller import FineTuneJobController

    seen = []
    controller = FineTuneJobController(None, OperatorSettings(), Caches())
    def reconcile(key, body):
        import time

        seen.append(threading.current_thread().name)
        time.sleep(0.3)  # the burst arrives while the first run is busy
    controller._reconcile = reconcile
    controller.queue.start()
    try:
        body = {"metadata": {"namespace": "ns", "name": "j", "uid": "u"}}
        controller.on_finetunejob("ADDED", body)
        for _ in range(3):  # a burst of child events for the same job
            controller.on_child(controller.caches.pods, "MODIFIED", {"metadata": {
                "namespace": "ns", "name": "p", "resourceVersion": "1",
                "labels": {"kubetune.io/finetunejob": "j"}}})
        import time
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1.0)
    finally:
        controller.queue.stop()
    assert seen and all(name.startswith("kubetune-finetunejob") for name in seen)
    assert len(seen) == 2  # four events: one run, and one rerun for the burst
