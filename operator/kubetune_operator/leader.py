"""Leader election on a coordination.k8s.io/v1 Lease, the way kube-controller-manager does it:
a standby replica waits until the Lease is free or expired, then takes it and starts the
operator; the leader renews it and exits the process the moment it cannot (Kubernetes restarts
it as the new standby). Only the leader runs anything — watches, queues, resyncs — so two
replicas never act at once. (kopf's own peering freezes replicas of equal priority and does not
pause our work queues, so it is not used for active/standby.)"""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timezone

import structlog
from kubernetes import client
from kubernetes.client.rest import ApiException

log = structlog.get_logger("kubetune.operator")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _fmt(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Expiry is judged by this replica's own monotonic clock, never by comparing the Lease's
    renewTime (written with another machine's clock) to ours: a Lease counts as expired when
    its record has not changed for leaseDurationSeconds since *we* first saw it — client-go's
    rule, so a skewed clock cannot make a standby take a live Lease. The leader gives up
    (exits) when it could not renew within `renew_deadline` (two thirds of the lease) of the
    start of its last successful renewal, before any standby may take over; every API call has
    a timeout shorter than the renew period, so a hung call cannot stretch that."""

    def __init__(self, api: client.ApiClient, namespace: str, name: str, identity: str,
                 lease_seconds: int = 15, renew_seconds: float = 5.0,
                 clock=time.monotonic, wall=_now, on_lost=None):
        self.coord = client.CoordinationV1Api(api)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_seconds, self.renew_seconds = lease_seconds, renew_seconds
        self.renew_deadline = lease_seconds * 2 / 3
        self.request_timeout = max(min(renew_seconds, self.renew_deadline / 2), 0.5)
        self.clock, self.wall = clock, wall
        self.on_lost = on_lost or (lambda: os._exit(1))
        self._seen: tuple | None = None  # the Lease record as last read
        self._seen_at = 0.0  # our monotonic time when that record was first seen

    def _try(self) -> bool:
        """Take or renew the Lease once; True if we hold it afterwards."""
        now = self.wall()
        timeout = self.request_timeout
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_seconds,
                "renewTime": _fmt(now)}
        try:
            lease = self.coord.read_namespaced_lease(self.name, self.namespace,
                                                     _request_timeout=timeout)
        except ApiException as exc:
            if exc.status != 404:
                raise
            try:
                self.coord.create_namespaced_lease(self.namespace, {
                    "metadata": {"name": self.name},
                    "spec": {**spec, "acquireTime": _fmt(now), "leaseTransitions": 0}},
                    _request_timeout=timeout)
                return True
            except ApiException as exc2:
                if exc2.status == 409:
                    return False
                raise
        holder = lease.spec.holder_identity
        duration = lease.spec.lease_duration_seconds or self.lease_seconds
        record = (holder, lease.spec.renew_time, lease.metadata.resource_version)
        if record != self._seen:
            self._seen, self._seen_at = record, self.clock()
        expired = self.clock() > self._seen_at + duration
        if holder not in (None, "", self.identity) and not expired:
            return False
        body = {"metadata": {"name": self.name,
                             "resourceVersion": lease.metadata.resource_version},
                "spec": spec}
        if holder != self.identity:
            body["spec"]["acquireTime"] = _fmt(now)
            body["spec"]["leaseTransitions"] = (lease.spec.lease_transitions or 0) + 1
        try:
            self.coord.replace_namespaced_lease(self.name, self.namespace, body,
                                                _request_timeout=timeout)
            return True
        except ApiException as exc:
            if exc.status == 409:  # someone else renewed or took it first
                return False
            raise

    def acquire(self) -> None:
        """Block until we lead."""
        waiting = False
        while True:
            try:
                if self._try():
                    log.info("Leading", lease=f"{self.namespace}/{self.name}",
                             identity=self.identity)
                    self._renewed_from = self.clock()
                    return
            except Exception as exc:  # noqa: BLE001 - an apiserver hiccup: try again
                log.warning("Lease check failed", error=str(exc)[:300])
            if not waiting:
                log.info("Standing by: another replica leads",
                         lease=f"{self.namespace}/{self.name}")
                waiting = True
            time.sleep(self.renew_seconds / 2)

    def renew_once(self) -> bool:
        """One renewal attempt; False once another replica holds the Lease (then `on_lost`
        has been called)."""
        started = self.clock()
        try:
            if self._try():
                self._renewed_from = started  # counted from when the request went out
                return True
            log.error("Lost the lease to another replica; exiting")
            self.on_lost()
            return False
        except Exception as exc:  # noqa: BLE001 - the watchdog ends it at the deadline
            log.warning("Lease renewal failed", error=str(exc)[:300])
            return True

    def overdue(self) -> bool:
        return self.clock() > getattr(self, "_renewed_from", self.clock()) + \
            self.renew_deadline

    def keep(self) -> list[threading.Thread]:
        """Renew in the background. A watchdog of its own calls `on_lost` (exit the process)
        once the renew deadline passes, even while a renewal call is still hanging."""
        lost = threading.Event()
        self.stop = lost.set  # stops renewing (tests; the process normally just exits)

        def give_up(why: str) -> None:
            if not lost.is_set():
                lost.set()
                log.error(why)
                self.on_lost()

        def renew():
            while not lost.is_set():
                time.sleep(self.renew_seconds)
                if not lost.is_set() and not self.renew_once():
                    lost.set()

        def watchdog():
            while not lost.is_set():
                if self.overdue():
                    give_up("Could not renew the lease in time; exiting")
                time.sleep(min(0.2, self.renew_seconds / 4))

        threads = [threading.Thread(target=renew, name="kubetune-lease", daemon=True),
                   threading.Thread(target=watchdog, name="kubetune-lease-watchdog",
                                    daemon=True)]
        for thread in threads:
            thread.start()
        return threads
