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
from datetime import datetime, timedelta, timezone

import structlog
from kubernetes import client
from kubernetes.client.rest import ApiException

log = structlog.get_logger("kubetune.operator")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _fmt(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, api: client.ApiClient, namespace: str, name: str, identity: str,
                 lease_seconds: int = 15, renew_seconds: float = 5.0):
        self.coord = client.CoordinationV1Api(api)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_seconds, self.renew_seconds = lease_seconds, renew_seconds

    def _try(self) -> bool:
        """Take or renew the Lease once; True if we hold it afterwards."""
        now = _now()
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_seconds,
                "renewTime": _fmt(now)}
        try:
            lease = self.coord.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            try:
                self.coord.create_namespaced_lease(self.namespace, {
                    "metadata": {"name": self.name},
                    "spec": {**spec, "acquireTime": _fmt(now), "leaseTransitions": 0}})
                return True
            except ApiException as exc2:
                if exc2.status == 409:
                    return False
                raise
        holder = lease.spec.holder_identity
        renewed = lease.spec.renew_time
        duration = lease.spec.lease_duration_seconds or self.lease_seconds
        expired = renewed is None or renewed + timedelta(seconds=duration) < now
        if holder not in (None, "", self.identity) and not expired:
            return False
        body = {"metadata": {"name": self.name,
                             "resourceVersion": lease.metadata.resource_version},
                "spec": spec}
        if holder != self.identity:
            body["spec"]["acquireTime"] = _fmt(now)
            body["spec"]["leaseTransitions"] = (lease.spec.lease_transitions or 0) + 1
        try:
            self.coord.replace_namespaced_lease(self.name, self.namespace, body)
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
                    return
            except ApiException as exc:
                log.warning("Lease check failed", status=exc.status)
            if not waiting:
                log.info("Standing by: another replica leads",
                         lease=f"{self.namespace}/{self.name}")
                waiting = True
            time.sleep(self.renew_seconds / 2)

    def keep(self) -> None:
        """Renew in the background; exit the process when leadership cannot be kept."""
        def loop():
            deadline = time.monotonic() + self.lease_seconds
            while True:
                time.sleep(self.renew_seconds)
                try:
                    if self._try():
                        deadline = time.monotonic() + self.lease_seconds
                        continue
                    log.error("Lost the lease to another replica; exiting")
                    os._exit(1)
                except Exception as exc:  # noqa: BLE001 - keep trying until the deadline
                    log.warning("Lease renewal failed", error=str(exc))
                if time.monotonic() > deadline:
                    log.error("Could not renew the lease in time; exiting")
                    os._exit(1)
        threading.Thread(target=loop, name="kubetune-lease", daemon=True).start()
