"""Prometheus metrics of the operator (served on /metrics)."""

from __future__ import annotations

import threading
from collections import Counter as _Counter

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter("kubetune_reconciles_total", "Reconciles by kind and result",
                     ["kind", "result"])
RECONCILE_SECONDS = Histogram("kubetune_reconcile_duration_seconds", "Reconcile latency",
                              ["kind"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                                 2.5, 5, 10, 30))
FINETUNEJOBS = Gauge("kubetune_finetunejobs", "FineTuneJobs by phase", ["phase"])
ADAPTER_REPLICAS = Gauge("kubetune_adapter_replicas", "Adapter replicas by target and state",
                         ["namespace", "target", "state"])
API_REQUESTS = Counter("kubetune_api_requests_total",
                       "Kubernetes API requests made by reconciles (watches excluded)", ["verb"])
ADAPTER_QUEUE = Gauge("kubetune_adapter_queue_waiting",
                      "LoRAAdapters waiting for a reconcile worker (all namespaces)")
S3_ERRORS = Counter("kubetune_s3_errors_total", "S3 operation errors", ["operation"])
BEHAVIOUR_CHECKS = Counter("kubetune_adapter_behaviour_checks_total",
                           "Behaviour probes of loaded adapters by verdict (ok, mismatch)",
                           ["result"])

_phases: dict = {}
_phase_counts: _Counter = _Counter()
_lock = threading.Lock()


def observe_phase(key, phase: str | None) -> None:
    with _lock:
        old = _phases.pop(key, None)
        if old:
            _phase_counts[old] -= 1
            FINETUNEJOBS.labels(phase=old).set(_phase_counts[old])
        if phase:
            _phases[key] = phase
            _phase_counts[phase] += 1
            FINETUNEJOBS.labels(phase=phase).set(_phase_counts[phase])


_adapters: dict = {}


def observe_adapter(key, where: tuple | None) -> None:
    """Per-target totals of loaded/failed/desired replicas over every adapter on it.
    `where` is (namespace, deployment, {desired, loaded, failed}); None forgets the adapter."""
    with _lock:
        old = _adapters.pop(key, None)
        if where is not None:
            _adapters[key] = where
        for ns, target in {(w[0], w[1]) for w in (old, where) if w}:
            for state in ("desired", "loaded", "failed"):
                total = sum(w[2].get(state, 0) for w in _adapters.values()
                            if (w[0], w[1]) == (ns, target))
                ADAPTER_REPLICAS.labels(namespace=ns, target=target, state=state).set(total)


def serve(port: int, host: str = "0.0.0.0") -> None:
    start_http_server(port, addr=host)
