"""In-memory view of the watched objects (an informer cache): filled by a LIST at start-up and
kept fresh by watch events, so reconciles read children without API calls."""

from __future__ import annotations

import threading
from collections import defaultdict

Key = tuple[str, str]  # (namespace, name of the owning FineTuneJob)


class Store:
    def __init__(self):
        self._lock = threading.Lock()
        self._by_owner: dict[Key, dict[str, dict]] = defaultdict(dict)

    def put(self, owner: Key, obj: dict) -> None:
        with self._lock:
            name = obj["metadata"]["name"]
            current = self._by_owner[owner].get(name)
            if current and _rv(current) > _rv(obj):
                return  # an older event than what we hold
            self._by_owner[owner][name] = obj

    def remove(self, owner: Key, name: str) -> None:
        with self._lock:
            self._by_owner.get(owner, {}).pop(name, None)

    def children(self, owner: Key) -> list[dict]:
        with self._lock:
            return list(self._by_owner.get(owner, {}).values())

    def forget(self, owner: Key) -> None:
        with self._lock:
            self._by_owner.pop(owner, None)


def _rv(obj: dict) -> int:
    try:
        return int(obj["metadata"].get("resourceVersion") or 0)
    except ValueError:
        return 0


class Caches:
    def __init__(self):
        self.finetunejobs: dict[Key, dict] = {}
        self.jobs = Store()
        self.pods = Store()
        self.lock = threading.Lock()
