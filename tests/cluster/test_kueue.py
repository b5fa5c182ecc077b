"""Real Kueue (its controller and webhooks, built from its Go module) admits our Jobs on the
real node: Kueue, not the operator, starts a queued Job; a job that does not fit waits with
Kueue's reason in its status, as one gang (no pod of a multi-node job before all fit); a
higher-priority job preempts a running one, whose trainer checkpoints, is not charged a
retry, and resumes from its checkpoint once Kueue admits it again."""

import time

import pytest
import yaml
from kubernetes import client

from helpers import wait_for
from kubetune.devcluster import kueue as kueue_mod
from kubetune.devcluster.cluster import DevCluster
from test_finetunejob_training import _cond, _job, _status

pytestmark = [pytest.mark.cluster, pytest.mark.trainer]

PRIORITIES = {"kubetune-test-low": 100, "kubetune-test-high": 1000}


@pytest.fixture(scope="module")
def kueue(cluster):
    """Kueue on the session's cluster for this module; its webhooks go with it."""
    dev = DevCluster(cluster.dir)
    dev.start_kueue(progress=print, queues=False)
    sched = client.SchedulingV1Api(cluster.api)
    for name, value in PRIORITIES.items():
        try:
            sched.create_priority_class({"metadata": {"name": name}, "value": value,
                                         "preemptionPolicy": "Never"})
        except client.ApiException as exc:
            if exc.status != 409:
                raise
    try:
        yield dev
    finally:
        # The tests' namespaces are being deleted: Kueue releases its Workloads' finalizers
        # first (stopped earlier, it would leave them Terminating).
        custom = client.CustomObjectsApi(cluster.api)
        try:
            wait_for(lambda: not custom.list_cluster_custom_object(
                "kueue.x-k8s.io", "v1beta2", "workloads")["items"], timeout=120,
                message="Kueue's Workloads gone with their namespaces")
            for name in CLUSTER_QUEUES:  # cluster-scoped: not gone with the namespaces
                cluster.kubectl("delete", "clusterqueue", name, "--ignore-not-found",
                                "--timeout=60s")
        finally:
            dev.stop_kueue()
            left = cluster.kubectl("get", "mutatingwebhookconfigurations,"
                                   "validatingwebhookconfigurations", "-o", "name").stdout
            assert "kueue" not in left, left  # a webhook without its server refuses Jobs


CLUSTER_QUEUES: list[str] = []


def _queues(cluster, ns: str, gpus: int) -> None:
    CLUSTER_QUEUES.append(ns)
    dev = DevCluster(cluster.dir)
    dev._kueue().apply([
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor",
         "metadata": {"name": "default-flavor"}},
        kueue_mod.cluster_queue(ns, gpus, cpu="32", memory="128Gi"),
        kueue_mod.local_queue("team", ns, ns)])


def _workloads(cluster, ns: str) -> list[dict]:
    return client.CustomObjectsApi(cluster.api).list_namespaced_custom_object(
        "kueue.x-k8s.io", "v1beta2", ns, "workloads")["items"]


def _suspend_owner(cluster, ns: str, job: str) -> set[str]:
    """The field managers that own the Job's spec.suspend (server-side field tracking)."""
    obj = client.BatchV1Api(cluster.api).read_namespaced_job(job, ns)
    return {m.manager for m in obj.metadata.managed_fields or []
            if "f:suspend" in ((m.fields_v1 or {}).get("f:spec") or {})}


def _wait_status(cluster, ns: str, name: str, ok, timeout: float, message: str,
                 interval: float = 0.25) -> dict:
    """Wait until `ok(status)`; a timeout tells the last status and Kueue's Workloads (what
    the operator showed and what Kueue said), not just False."""
    seen: dict = {}

    def look():
        seen["status"] = st = _status(cluster, ns, name)
        return ok(st) and st

    try:
        return wait_for(look, timeout=timeout, interval=interval, message=message)
    except AssertionError as exc:
        said = [(w["metadata"]["name"], (w.get("status") or {}).get("conditions"))
                for w in _workloads(cluster, ns)]
        raise AssertionError(f"{exc}\nstatus of {name}: {seen.get('status')}\n"
                             f"Workloads: {said}") from None


def _apply(cluster, ns, obj) -> float:
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(obj))
    return time.monotonic()


def test_kueue_admits_holds_a_gang_and_preempts_with_a_checkpoint(cluster, operator, kueue,
                                                                  job_namespace):
    ns = job_namespace
    _queues(cluster, ns, gpus=2)
    queued = {"scheduling": {"queueName": "team"}}
    t0 = _apply(cluster, ns, _job("low", 1500, retryPolicy={"maxRetries": 0},
                                  resources={"priorityClassName": "kubetune-test-low"},
                                  **queued))
    st = _wait_status(cluster, ns, "low", lambda s: s.get("phase") == "Running", timeout=240,
                      message="low Running")
    admitted = time.monotonic() - t0
    # Kueue admitted it and started the Job (the operator created it suspended, never
    # unsuspends a queued Job).
    owners = _suspend_owner(cluster, ns, "low-0")
    assert owners and all("kueue" in m for m in owners), owners
    [wl] = _workloads(cluster, ns)
    assert wl["status"]["admission"]["clusterQueue"] == ns

    # A two-node job asking for 2 GPUs while 1 is free: it waits whole (a gang), with
    # Kueue's reason; none of its pods exists.
    _apply(cluster, ns, _job("gang", 50, resources={"nodes": 2, "gpusPerNode": 1,
                                                    "priorityClassName": "kubetune-test-low"},
                             **queued))
    st = _wait_status(cluster, ns, "gang", lambda s: s.get("phase") == "Queued" and
                      "quota" in _cond(s, "Ready").get("message", ""), timeout=90,
                      message="gang Queued with Kueue's reason")
    ready = _cond(st, "Ready")
    assert ready["reason"] == "Queued", ready
    assert "insufficient unused quota for nvidia.com/gpu" in ready["message"], ready
    gang_wl = next(w for w in _workloads(cluster, ns)
                   if w["metadata"]["ownerReferences"][0]["name"] == "gang-0")
    assert sum(p["count"] for p in gang_wl["spec"]["podSets"]) == 2
    core = client.CoreV1Api(cluster.api)
    assert not core.list_namespaced_pod(ns, label_selector="kubetune.io/finetunejob=gang").items
    cluster.kubectl("delete", "ftj", "gang", "-n", ns, "--wait=true")

    wait_for(lambda: ((_status(cluster, ns, "low").get("progress") or {}).get("step") or 0)
             >= 250, timeout=300, interval=0.2, message="low past its first checkpoints")
    # A higher-priority job needing both GPUs: Kueue preempts the low one.
    t1 = _apply(cluster, ns, _job("high", 30, resources={
        "gpusPerNode": 2, "priorityClassName": "kubetune-test-high"}, **queued))
    st = _wait_status(cluster, ns, "low", lambda s: s.get("phase") == "Queued", timeout=120,
                      interval=0.2, message="low preempted")
    preempted = time.monotonic() - t1
    assert _cond(st, "Ready")["reason"] == "Preempted", _cond(st, "Ready")
    assert "Preempted to accommodate" in _cond(st, "Ready")["message"]
    assert st["retries"] == 0 and len(st["attempts"]) == 1
    high = wait_for(lambda: (s := _status(cluster, ns, "high")).get("phase") in
                    ("Succeeded", "Failed") and s, timeout=300, message="high finished")
    high_done = time.monotonic() - t1
    assert high["phase"] == "Succeeded", high

    st = wait_for(lambda: (s := _status(cluster, ns, "low")).get("phase") in
                  ("Succeeded", "Failed") and s, timeout=600, message="low finished")
    low_done = time.monotonic() - t1
    assert st["phase"] == "Succeeded", st
    [attempt] = st["attempts"]  # one attempt, one Job: Kueue resumed it
    assert attempt["reason"] == "Succeeded" and attempt["countsAgainstRetries"] is False
    assert attempt["resumedFromStep"] >= 200  # a checkpoint, not step 0
    assert st["retries"] == 0  # maxRetries is 0, and it still succeeded
    events = cluster.kubectl("get", "events", "-n", ns, "--field-selector",
                             "involvedObject.name=low").stdout
    assert "Running -> Queued: Kueue Preempted" in events, events
    print(f"\nKueue timeline: low admitted+Running {admitted:.1f}s after apply; "
          f"preempted {preempted:.1f}s after high applied; high Succeeded at {high_done:.1f}s;"
          f" low Succeeded (resumed from step {attempt['resumedFromStep']}) at "
          f"{low_done:.1f}s")


def test_suspending_a_queued_job_deactivates_its_workload(cluster, operator, kueue,
                                                          job_namespace):
    """spec.scheduling.suspend on a job Kueue runs: its Workload is deactivated (Kueue's way
    to stop a Job; it would start a suspended admitted Job again), the pod stops, and
    resuming queues it again."""
    ns = job_namespace
    _queues(cluster, ns, gpus=1)
    _apply(cluster, ns, _job("paused", 1500, scheduling={"queueName": "team"}))
    wait_for(lambda: _status(cluster, ns, "paused").get("phase") == "Running", timeout=240,
             message="Running")
    cluster.kubectl("patch", "ftj", "paused", "-n", ns, "--type=merge", "-p",
                    '{"spec":{"scheduling":{"suspend":true}}}')
    st = wait_for(lambda: (s := _status(cluster, ns, "paused")).get("phase") == "Suspended" and
                  s, timeout=120, message="Suspended")
    [wl] = _workloads(cluster, ns)
    assert wl["spec"]["active"] is False
    core = client.CoreV1Api(cluster.api)
    wait_for(lambda: not [p for p in core.list_namespaced_pod(
        ns, label_selector="kubetune.io/finetunejob=paused").items
        if p.status.phase in ("Pending", "Running")], timeout=120, message="the pod stopped")
    time.sleep(5)  # Kueue does not start it again
    assert client.BatchV1Api(cluster.api).read_namespaced_job("paused-0", ns).spec.suspend
    cluster.kubectl("patch", "ftj", "paused", "-n", ns, "--type=merge", "-p",
                    '{"spec":{"scheduling":{"suspend":false}}}')
    wait_for(lambda: _status(cluster, ns, "paused").get("phase") == "Running", timeout=240,
             message="Running again")
    assert st["retries"] == 0
