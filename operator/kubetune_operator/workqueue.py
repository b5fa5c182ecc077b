"""Delayed reconciles (retry back-off, TTL, errors): one thread sleeping until the next due key.
No polling: it wakes only when something is due or newly scheduled."""

from __future__ import annotations

import heapq
import threading
import time
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
    """Keys reconciled by a small worker pool, each key by one worker at a time. Adding a key
    that is running marks it dirty: it runs once more when the current run ends. Bursts of
    events for one key collapse into one run; `add(key, delay)` schedules a later look."""

    def __init__(self, handler: Callable[[Hashable], None], workers: int = 4):
        from concurrent.futures import ThreadPoolExecutor

        self.handler = handler
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="kubetune-adapter")
        self._running: set = set()
        self._dirty: set = set()
        self._lock = threading.Lock()
        self._delay = DelayQueue(self._submit)

    def start(self) -> None:
        self._delay.start()

    def stop(self) -> None:
        self._delay.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def add(self, key: Hashable, delay: float = 0.0) -> None:
        if delay > 0:
            self._delay.add_after(key, delay)
        else:
            self._submit(key)

    def _submit(self, key: Hashable) -> None:
        with self._lock:
            if key in self._running:
                self._dirty.add(key)
                return
            self._running.add(key)
        self._pool.submit(self._run, key)

    def _run(self, key: Hashable) -> None:
        try:
            self.handler(key)
        except Exception:  # noqa: BLE001 - the handler logs; retry later
            self._delay.add_after(key, 10)
        finally:
            with self._lock:
                self._running.discard(key)
                again = key in self._dirty
                self._dirty.discard(key)
        if again:
            self._submit(key)
