"""A byte budget for a download folder (serve's s3:// adapters, the adapter-sync sidecar's
/adapters): room is reserved from the manifest's sizes before the first byte is fetched, so a
download that would not fit is refused and nothing is written.

`evict(needed)` (optional) is asked to free room when the budget is short: it returns the
bytes it removed (the sidecar drops its least recently used synced folders)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable


class BudgetExceeded(Exception):
    pass


def folder_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (symlinks are not followed or counted)."""
    total = 0
    for item in path.rglob("*"):
        try:
            if item.is_file() and not item.is_symlink():
                total += item.stat().st_size
        except OSError:
            pass
    return total


class DiskBudget:
    def __init__(self, cap: int, used: int = 0,
                 evict: Callable[[int], int] | None = None, what: str = "the cache"):
        if cap < 1:
            raise ValueError("a disk budget must be at least 1 byte")
        self.cap, self.used, self.evict, self.what = cap, used, evict, what
        self.lock = threading.Lock()

    def reserve(self, nbytes: int) -> None:
        """Hold `nbytes` or raise BudgetExceeded (holding nothing)."""
        with self.lock:
            if nbytes > self.cap:
                raise BudgetExceeded(f"needs {nbytes} bytes, more than {self.what}'s whole "
                                     f"{self.cap}-byte limit")
            short = self.used + nbytes - self.cap
            if short > 0 and self.evict is not None:
                self.used = max(self.used - self.evict(short), 0)
            if self.used + nbytes > self.cap:
                raise BudgetExceeded(f"needs {nbytes} bytes; {self.what} holds {self.used} of "
                                     f"its {self.cap}-byte limit (unload an adapter first)")
            self.used += nbytes

    def settle(self, reserved: int, actual: int) -> None:
        """A kept download holds `actual` bytes on disk (its files and any record beside them)
        where `reserved` were held: count what is really there."""
        with self.lock:
            self.used = max(self.used - reserved + actual, 0)

    def release(self, nbytes: int) -> None:
        with self.lock:
            self.used = max(self.used - nbytes, 0)
