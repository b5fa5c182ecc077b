"""The operator's one work queue (both kinds): keys reconciled by a worker pool, never on
kopf's threads; bursts collapse; fair between namespaces; failures retried with per-key
exponential back-off and jitter. Delayed looks (retry back-off, TTL, resync) wait in a
DelayQueue: one thread sleeping until the next due key, no polling."""

from __future__ import annotations

import heapq
import random
import threading
import time
from collections import deque
from typing import Callable, Hashable


class DelayQueue:
    def __init__(self, handler: Callable[[Hashable], None]):
        self.handler = handler
        self._heap: list[tuple[float, int, Hashable]] = []
        self._due: dict[Hashable, float] = {}
        self._cond = threading.Condition()
        self._seq = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="kubetune-requeue", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def add_after(self, key: Hashable, delay: float) -> None:
        when = time.monotonic() + max(delay, 0.0)
        with self._cond:
            if key in self._due and self._due[key] <= when:
                return  # an earlier wake-up is already scheduled
            self._due[key] = when
            self._seq += 1
            heapq.heappush(self._heap, (when, self._seq, key))
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or
                                             self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                when, _, key = heapq.heappop(self._heap)
                if self._due.get(key) != when:
                    continue  # superseded by an earlier schedule
                del self._due[key]
            try:
                self.handler(key)
            except Exception:  # noqa: BLE001 - the handler logs; a failure must not kill us
                self.add_after(key, 10)


class WorkQueue:
    """Keys reconciled by a worker pool, each key by one worker at a time. Adding a key that
    is running marks it dirty: it runs once more when the current run ends. Bursts of events
    for one key collapse into one run; `add(key, delay)` schedules a later look.

    Fair between lanes (`lane_of(key)`, the namespace for the LoRAAdapter controller): one
    lane runs at most `per_lane` keys at once, and free workers go to the lanes with waiting
    keys in turn. A tenant whose serving pods answer slowly (a load may take minutes) holds
    at most `per_lane` workers; every other namespace keeps the rest."""

    def __init__(self, handler: Callable[[Hashable], None], workers: int = 16,
                 per_lane: int = 2, lane_of: Callable[[Hashable], Hashable] | None = None,
                 name: str = "kubetune-worker", backoff: tuple[float, float] = (0.5, 300.0)):
        from concurrent.futures import ThreadPoolExecutor

        if workers < 1 or per_lane < 1:
            raise ValueError("workers and per_lane must be at least 1")
        self.handler = handler
        self.workers, self.per_lane = workers, min(per_lane, workers)
        self.lane_of = lane_of or (lambda key: key[0] if isinstance(key, tuple) else key)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self.backoff = backoff  # (first delay, cap) of retries after failures, in seconds
        self._failures: dict[Hashable, int] = {}
        self._running: set = set()
        self._dirty: set = set()
        self._waiting: dict[Hashable, dict[Hashable, None]] = {}  # lane -> keys, in order
        self._turns: deque = deque()  # lanes with waiting keys, next turn first
        self._busy: dict[Hashable, int] = {}  # lane -> keys running
        self._lock = threading.Lock()
        self._stopped = False
        self._delay = DelayQueue(self._submit)

    def start(self) -> None:
        self._delay.start()

    def stop(self) -> None:
        self._delay.stop()
        with self._lock:
            self._stopped = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    def add(self, key: Hashable, delay: float = 0.0) -> None:
        if delay > 0:
            self._delay.add_after(key, delay)
        else:
            self._submit(key)

    def retry(self, key: Hashable) -> float:
        """A failed reconcile: look again after base·2^(n-1) seconds (capped), ±20 % jitter so
        keys that failed together (an apiserver hiccup) do not come back together."""
        with self._lock:
            n = self._failures[key] = self._failures.get(key, 0) + 1
        first, cap = self.backoff
        delay = min(first * 2 ** (n - 1), cap) * random.uniform(0.8, 1.2)
        self.add(key, delay)
        return delay

    def forget(self, key: Hashable) -> None:
        """A successful reconcile: the next failure starts the back-off from the beginning."""
        with self._lock:
            self._failures.pop(key, None)

    def depth(self) -> int:
        """Keys waiting for a worker (not counting running ones)."""
        with self._lock:
            return sum(len(keys) for keys in self._waiting.values())

    def _submit(self, key: Hashable) -> None:
        with self._lock:
            if key in self._running:
                self._dirty.add(key)
                return
            lane = self.lane_of(key)
            keys = self._waiting.setdefault(lane, {})
            if key in keys:
                return
            keys[key] = None
            if lane not in self._turns:
                self._turns.append(lane)
            start = self._take()
        self._start(start)

    def _take(self) -> list:
        """Keys to start now (under the lock): round robin over lanes with waiting keys,
        skipping lanes at their limit, until the pool is full."""
        start = []
        if self._stopped:
            return start
        skipped = 0
        while self._turns and len(self._running) < self.workers and skipped < len(self._turns):
            lane = self._turns[0]
            if self._busy.get(lane, 0) >= self.per_lane:
                self._turns.rotate(-1)
                skipped += 1
                continue
            keys = self._waiting[lane]
            key = next(iter(keys))
            del keys[key]
            self._turns.popleft()
            if keys:
                self._turns.append(lane)  # its next key waits for the other lanes' turns
            else:
                del self._waiting[lane]
            self._running.add(key)
            self._busy[lane] = self._busy.get(lane, 0) + 1
            start.append(key)
            skipped = 0
        return start

    def _start(self, keys: list) -> None:
        for key in keys:
            try:
                self._pool.submit(self._run, key)
            except RuntimeError:  # stopped meanwhile
                return

    def _run(self, key: Hashable) -> None:
        try:
            self.handler(key)
        except Exception:  # noqa: BLE001 - the handler logs; retry later
            self.retry(key)
        finally:
            lane = self.lane_of(key)
            with self._lock:
                self._running.discard(key)
                self._busy[lane] -= 1
                if not self._busy[lane]:
                    del self._busy[lane]
                again = key in self._dirty
                self._dirty.discard(key)
                start = self._take()
            self._start(start)
        if again:
            self._submit(key)
