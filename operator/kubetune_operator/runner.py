"""One reconcile, instrumented: its duration and result go to the metrics, a failure is logged
and handed back for a retry."""

from __future__ import annotations

import time
from typing import Callable

import structlog

from .metrics import RECONCILE_SECONDS, RECONCILES

log = structlog.get_logger("kubetune.operator")


class Reported(Exception):
    """A failure already told to the user (status conditions and an Event), e.g. a create the
    apiserver refused: retried with back-off like any other, logged as one warning line, not a
    traceback on every retry."""


def namespace_terminating(exc: Exception) -> bool:
    """The apiserver refused a create because the namespace is being deleted: nothing to do,
    the objects go with the namespace."""
    return getattr(exc, "status", None) == 403 and "NamespaceTerminating" in str(
        getattr(exc, "body", "") or "")


def run_reconcile(kind: str, key, body: dict | None,
                  reconcile: Callable[[object, dict], None],
                  retry: Callable[[object], None]) -> str:
    """One reconcile with its duration and result (success/skipped/error) recorded, and
    returned. No body means nothing to do (skipped); an exception is logged and the key
    handed to `retry`."""
    start = time.perf_counter()
    result = "skipped"
    try:
        if body is not None:
            try:
                reconcile(key, body)
                result = "success"
            except Exception as exc:
                if namespace_terminating(exc):
                    result = "skipped"
                    log.info("Namespace is being deleted; nothing to reconcile", kind=kind,
                             namespace=key[0], name=key[1])
                    return result
                result = "error"
                if isinstance(exc, Reported):
                    log.warning("Reconcile failed (said in status); retrying", kind=kind,
                                namespace=key[0], name=key[1], error=str(exc))
                else:
                    log.exception("Reconcile failed", kind=kind, namespace=key[0],
                                  name=key[1])
                retry(key)
    finally:
        RECONCILE_SECONDS.labels(kind=kind).observe(time.perf_counter() - start)
        RECONCILES.labels(kind=kind, result=result).inc()
    return result
