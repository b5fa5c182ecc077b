"""Killing the operator (SIGKILL) mid-reconcile and starting it again: no duplicate Jobs,
status converges."""

import os
import signal
import time

import pytest
import yaml
from kubernetes import client

from helpers import start_operator, stop_operator, wait_for
from kubetune.devcluster.cluster import NodeSpec, kwok_finetunejob, node_manifest

pytestmark = pytest.mark.cluster

N = 12


def test_sigkill_mid_reconcile_never_duplicates_jobs(cluster, crds, s3_server, tmp_path):
    core = client.CoreV1Api(cluster.api)
    ns = f"restart-{int(time.time())}"
    core.create_namespace({"metadata": {"name": ns}})
    # Its own tainted KWOK node with room for all N: pods of other tests (sharing the dev
    # cluster's GPU nodes) can neither take this capacity nor land here.
    taint = {"key": "kubetune.io/pool", "value": ns, "effect": "NoSchedule"}
    core.create_node(node_manifest(NodeSpec(ns, N, {"kubetune.io/pool": ns}, [taint])))
    op = None
    try:
        op = start_operator(cluster, s3_server, tmp_path, namespaces=[ns])
        manifests = "\n---\n".join(yaml.safe_dump(kwok_finetunejob(
            f"job-{i}", f"s3://kubetune/restart/job-{i}", {"kubetune.io/pool": ns}, [taint]))
            for i in range(N))
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=manifests)
        batch = client.BatchV1Api(cluster.api)
        # Kill it while it is creating children: after some, before all, Jobs exist.
        wait_for(lambda: len(batch.list_namespaced_job(ns).items) >= 1, interval=0.02,
                 message="first Job")
        os.kill(op.proc.pid, signal.SIGKILL)
        op.proc.wait()
        killed_at = len(batch.list_namespaced_job(ns).items)

        for _ in range(2):  # restart, kill again quickly, restart for good
            op = start_operator(cluster, s3_server, tmp_path, namespaces=[ns])
            time.sleep(0.3)
            os.kill(op.proc.pid, signal.SIGKILL)
            op.proc.wait()
        op = start_operator(cluster, s3_server, tmp_path, namespaces=[ns])
        api = client.CustomObjectsApi(cluster.api)

        def converged():
            items = api.list_namespaced_custom_object("kubetune.io", "v1alpha1", ns,
                                                      "finetunejobs")["items"]
            return all((i.get("status") or {}).get("phase") == "Running" for i in items) and items

        try:
            items = wait_for(converged, timeout=120, message="all Running")
        except AssertionError as exc:
            items = api.list_namespaced_custom_object("kubetune.io", "v1alpha1", ns,
                                                      "finetunejobs")["items"]
            states = [(i["metadata"]["name"], (i.get("status") or {}).get("phase"),
                       [c.get("message") for c in (i.get("status") or {}).get("conditions", [])
                        if c["type"] == "Ready"]) for i in items]
            raise AssertionError(f"{exc}\n{states}\n{op.tail(40)}") from None
        jobs = batch.list_namespaced_job(ns).items
        names = sorted(j.metadata.name for j in jobs)
        assert names == sorted(f"job-{i}-0" for i in range(N)), names  # one attempt each
        for item in items:
            st = item["status"]
            assert st["jobName"] == f"{item['metadata']['name']}-0"
            assert [a["number"] for a in st["attempts"]] == [0]
            assert st["observedGeneration"] == 1
        assert killed_at <= N
        assert {p.spec.node_name for p in core.list_namespaced_pod(ns).items} == {ns}
    finally:
        if op is not None and op.proc.poll() is None:
            stop_operator(op)  # also when the test fails: never leave an operator behind
        core.delete_namespace(ns)
        core.delete_node(ns)
