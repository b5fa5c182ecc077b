"""Active/standby: two operators with --leader-elect on one Lease. Only the leader acts; when
it dies without releasing, the standby takes over within the lease time and acts."""

from __future__ import annotations

import secrets
import time

import pytest
from kubernetes import client

from helpers import start_operator, stop_operator, wait_for
from kubetune.devcluster.cluster import kwok_finetunejob

pytestmark = pytest.mark.cluster


def test_only_the_leader_acts_and_the_standby_takes_over(cluster, crds, s3_server, tmp_path):
    ns = f"kt-le-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", ns)
    env = {"KUBETUNE_LEADER_ELECTION": "true", "KUBETUNE_LEADER_ELECTION_NAMESPACE": ns,
           "KUBETUNE_LEASE_SECONDS": "4"}
    coord = client.CoordinationV1Api(cluster.api)
    custom = client.CustomObjectsApi(cluster.api)
    batch = client.BatchV1Api(cluster.api)
    first = start_operator(cluster, s3_server, tmp_path, namespaces=[ns], extra_env=env)
    second = None
    try:
        lease = wait_for(lambda: coord.read_namespaced_lease("kubetune-operator", ns),
                         timeout=30, message="lease")
        leader = lease.spec.holder_identity
        second = start_operator(cluster, s3_server, tmp_path, namespaces=[ns], extra_env=env)
        wait_for(lambda: "Standing by" in second.log.read_text(), timeout=30,
                 message="second operator standing by")
        custom.create_namespaced_custom_object("kubetune.io", "v1alpha1", ns, "finetunejobs",
                                               kwok_finetunejob("one", "s3://kubetune/le/one"))
        wait_for(lambda: batch.list_namespaced_job(ns).items, timeout=30, message="Job")
        time.sleep(2)
        assert "Created Job" in first.log.read_text()
        assert "Created Job" not in second.log.read_text()  # the standby did nothing

        first.proc.kill()  # dies holding the lease
        first.proc.wait()
        lease = wait_for(lambda: (le := coord.read_namespaced_lease("kubetune-operator", ns))
                         and le.spec.holder_identity != leader and le, timeout=30,
                         message="standby takes the lease")
        assert lease.spec.lease_transitions == 1
        custom.create_namespaced_custom_object("kubetune.io", "v1alpha1", ns, "finetunejobs",
                                               kwok_finetunejob("two", "s3://kubetune/le/two"))
        wait_for(lambda: [j for j in batch.list_namespaced_job(ns).items
                          if j.metadata.name == "two-0"], timeout=30, message="Job of two")
        assert "Leading" in second.log.read_text()
    finally:
        for op in (first, second):
            if op is not None and op.proc.poll() is None:
                stop_operator(op)
        cluster.kubectl("delete", "namespace", ns, "--wait=false")


def _elector(cluster, ns: str, identity: str, **kwargs):
    from kubetune_operator.leader import LeaderElector

    return LeaderElector(cluster.api, ns, "skew", identity, lease_seconds=3,
                         renew_seconds=0.5, **kwargs)


def test_a_standby_with_a_skewed_clock_never_takes_a_live_lease(cluster):
    """The standby's wall clock is an hour ahead: judged by renewTime it would find the Lease
    long expired. Expiry is judged by how long the record has not changed on the standby's
    own monotonic clock, so it waits while the leader renews, and takes over once it stops."""
    from datetime import timedelta

    from kubetune_operator.leader import _now

    ns = f"kt-skew-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", ns)
    lost = []
    leader = _elector(cluster, ns, "leader", on_lost=lambda: lost.append("leader"))
    leader.acquire()
    leader.keep()
    ahead = _elector(cluster, ns, "ahead", wall=lambda: _now() + timedelta(hours=1),
                     on_lost=lambda: lost.append("ahead"))
    try:
        until = time.monotonic() + 7  # more than two lease durations
        while time.monotonic() < until:
            assert not ahead._try(), "a standby with a skewed clock took a live lease"
            time.sleep(0.5)
        assert lost == []
        lease = client.CoordinationV1Api(cluster.api).read_namespaced_lease("skew", ns)
        assert lease.spec.holder_identity == "leader"
        leader.stop()  # the leader dies without releasing
        stopped = time.monotonic()
        wait_for(ahead._try, timeout=10, interval=0.3, message="takeover")
        assert time.monotonic() - stopped >= 2  # not before the lease ran out
    finally:
        leader.stop()
        cluster.kubectl("delete", "namespace", ns, "--wait=false")
