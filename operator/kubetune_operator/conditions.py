"""Status conditions by the Kubernetes API conventions; setting one reports whether it changed."""

from __future__ import annotations

from datetime import datetime


def _ts(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def find(conditions: list[dict], kind: str) -> dict | None:
    return next((c for c in conditions if c.get("type") == kind), None)


def set_condition(conditions: list[dict], kind: str, status: bool | str, reason: str,
                  message: str, generation: int | None, now: datetime) -> bool:
    """Insert or update a condition in place; lastTransitionTime moves only when status flips."""
    value = status if isinstance(status, str) else ("True" if status else "False")
    current = find(conditions, kind)
    new = {"type": kind, "status": value, "reason": reason, "message": message[:32000],
           "observedGeneration": generation}
    if current is None:
        conditions.append({**new, "lastTransitionTime": _ts(now)})
        return True
    changed = any(current.get(k) != v for k, v in new.items())
    if current.get("status") != value:
        current["lastTransitionTime"] = _ts(now)
    current.update(new)
    return changed


def is_true(conditions: list[dict], kind: str) -> bool:
    cond = find(conditions, kind)
    return bool(cond and cond.get("status") == "True")
