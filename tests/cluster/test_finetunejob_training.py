"""FineTuneJobs that really train: the trainer image runs on the real node (kubelet +
containerd), as user 65532 on a read-only root filesystem in a restricted namespace.
Live progress, a verified artifact and a LoRAAdapter; preemption resumes without using a retry;
application failures use retries up to the limit."""

import time

import pytest
import yaml
from kubernetes import client

from helpers import wait_for
from kubetune import artifacts
from kubetune.storage import Storage

pytestmark = [pytest.mark.cluster, pytest.mark.trainer]

REAL_NODE = {"kubetune.io/real-node": "true"}


def _job(name: str, steps: int, **spec) -> dict:
    obj = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": name},
           "spec": {"baseModel": {"uri": "builtin://tiny-llama", "revision": "v1"},
                    "dataset": {"train": {"uri": "builtin://tiny-chat"}, "format": "messages",
                                "maxLength": 128},
                    "method": {"type": "LoRA", "lora": {"r": 8}},
                    "training": {"maxSteps": steps, "learningRate": 0.003,
                                 "perDeviceBatchSize": 8, "gradientAccumulationSteps": 1,
                                 "loggingSteps": 5},
                    "resources": {"gpusPerNode": 1, "nodeSelector": REAL_NODE},
                    "checkpointing": {"everySteps": 100, "keepLast": 2},
                    "output": {"uri": f"s3://kubetune/e2e/{name}-{int(time.time())}"}}}
    for key, value in spec.items():
        obj["spec"][key] = {**obj["spec"].get(key, {}), **value}
    return obj


def _status(cluster, ns, name) -> dict:
    return client.CustomObjectsApi(cluster.api).get_namespaced_custom_object(
        "kubetune.io", "v1alpha1", ns, "finetunejobs", name).get("status") or {}


def _cond(st, kind):
    return next((c for c in st.get("conditions") or [] if c["type"] == kind), {})


def test_full_run_live_progress_verified_artifact_and_adapter(cluster, operator, job_namespace,
                                                              s3_server, tmp_path):
    ns = job_namespace
    obj = _job("full", 600, output={"createAdapter": {"name": "{job}-v1",
                                                     "servingName": "assistant-v1",
                                                     "alias": "assistant"}})
    path = tmp_path / "ftj.yaml"
    path.write_text(yaml.safe_dump(obj))
    cluster.kubectl("apply", "-n", ns, "-f", str(path))

    steps_seen = set()
    deadline = time.monotonic() + 300
    st = {}
    while time.monotonic() < deadline:
        st = _status(cluster, ns, "full")
        step = (st.get("progress") or {}).get("step")
        if st.get("phase") == "Running" and step is not None:
            steps_seen.add(step)
        if st.get("phase") in ("Succeeded", "Failed"):
            break
        time.sleep(0.3)
    assert st.get("phase") == "Succeeded", st
    assert len({s for s in steps_seen if s < 600}) >= 2, steps_seen  # live, not just the end
    assert st["progress"]["totalSteps"] == 600 and st["progress"]["percent"] == 100
    assert _cond(st, "ArtifactPublished")["status"] == "True"
    assert _cond(st, "Ready")["status"] == "True" and _cond(st, "Succeeded")["status"] == "True"

    artifact = st["artifact"]
    manifest, digest = artifacts.verify(
        artifact["uri"], Storage(s3_server.endpoint, access_key=s3_server.access_key,
                                 secret_key=s3_server.secret_key), tmp_path / "adapter")
    assert digest == artifact["manifestSha256"]
    assert manifest["metrics"]["steps"] == 600

    adapters = client.CustomObjectsApi(cluster.api).list_namespaced_custom_object(
        "kubetune.io", "v1alpha1", ns, "loraadapters")["items"]
    assert [a["metadata"]["name"] for a in adapters] == ["full-v1"]
    spec = adapters[0]["spec"]
    assert spec["source"] == {"uri": artifact["uri"], "sha256": artifact["manifestSha256"]}
    assert spec["baseModel"] == {"uri": "builtin://tiny-llama", "revision": "v1"}
    assert spec["servingName"] == "assistant-v1" and spec["alias"] == "assistant"
    assert st["adapterRef"] == "full-v1"
    assert not adapters[0]["metadata"].get("ownerReferences")  # outlives the job

    # Re-reconciles (a touched object) never create a second adapter or Job.
    cluster.kubectl("annotate", "ftj", "full", "-n", ns, "touched=1")
    time.sleep(2)
    assert len(client.CustomObjectsApi(cluster.api).list_namespaced_custom_object(
        "kubetune.io", "v1alpha1", ns, "loraadapters")["items"]) == 1
    assert len(client.BatchV1Api(cluster.api).list_namespaced_job(ns).items) == 1

    # The trainer's own token may patch its progress only: a forged status.artifact is refused
    # by the trainer-status policy, and the metadata (the seal) by RBAC.
    token = cluster.kubectl("create", "token", "full-trainer", "-n", ns).stdout.strip()
    config = client.Configuration()
    config.host = cluster.api.configuration.host
    config.ssl_ca_cert = cluster.api.configuration.ssl_ca_cert
    config.api_key = {"authorization": f"Bearer {token}"}
    as_trainer = client.CustomObjectsApi(client.ApiClient(config))
    forged = {**artifact, "uri": f"s3://{s3_server.bucket}/forged/elsewhere"}
    with pytest.raises(client.ApiException) as denied:
        as_trainer.patch_namespaced_custom_object_status("kubetune.io", "v1alpha1", ns,
                                                         "finetunejobs", "full",
                                                         {"status": {"artifact": forged}})
    assert denied.value.status == 403 and "may change only status.progress" in denied.value.body
    with pytest.raises(client.ApiException) as denied:
        as_trainer.patch_namespaced_custom_object(
            "kubetune.io", "v1alpha1", ns, "finetunejobs", "full",
            {"metadata": {"annotations": {"kubetune.io/artifact-seal": "sha256:0"}}})
    assert denied.value.status == 403
    # Anyone else who may write status but not the seal (the seal is the second line): the
    # operator does not trust it, verifies again and writes back the sealed artifact.
    client.CustomObjectsApi(cluster.api).patch_namespaced_custom_object_status(
        "kubetune.io", "v1alpha1", ns, "finetunejobs", "full", {"status": {"artifact": forged}})
    cluster.kubectl("annotate", "ftj", "full", "-n", ns, "touched=2", "--overwrite")
    wait_for(lambda: _status(cluster, ns, "full")["artifact"] == artifact, timeout=30,
             message="the sealed artifact restored")


def test_eviction_resumes_from_checkpoint_without_using_a_retry(cluster, operator,
                                                                job_namespace):
    ns = job_namespace
    obj = _job("preempt", 2000, retryPolicy={"maxRetries": 0})
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(obj))
    core = client.CoreV1Api(cluster.api)
    wait_for(lambda: ((_status(cluster, ns, "preempt").get("progress") or {}).get("step") or 0)
             >= 250, timeout=240, interval=0.2, message="past the first checkpoints")
    pod = core.list_namespaced_pod(ns, label_selector="kubetune.io/finetunejob=preempt").items[0]
    core.create_namespaced_pod_eviction(pod.metadata.name, ns, {
        "metadata": {"name": pod.metadata.name, "namespace": ns}})

    st = wait_for(lambda: (s := _status(cluster, ns, "preempt")).get("phase") in
                  ("Succeeded", "Failed") and s, timeout=400, message="finished")
    assert st["phase"] == "Succeeded", st
    first, second = st["attempts"][0], st["attempts"][1]
    assert first["reason"] == "Evicted" and first["countsAgainstRetries"] is False
    assert second["reason"] == "Succeeded"
    assert second["resumedFromStep"] >= 200  # a checkpoint, not step 0
    assert st["retries"] == 0  # maxRetries is 0, and the job still succeeded
    events = cluster.kubectl("get", "events", "-n", ns, "--field-selector",
                             "involvedObject.name=preempt").stdout
    assert "does not count against retries" in events


def test_application_failure_counts_and_ends_with_backoff_limit_exceeded(cluster, operator,
                                                                         job_namespace):
    ns = job_namespace
    # S3 that refuses connections: the trainer's first checkpoint upload fails (exit 1).
    obj = _job("broken", 400, retryPolicy={"maxRetries": 1, "backoffSeconds": 1},
               checkpointing={"everySteps": 5},
               output={"endpoint": "http://127.0.0.1:9"})
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(obj))
    st = wait_for(lambda: (s := _status(cluster, ns, "broken")).get("phase") == "Failed" and s,
                  timeout=400, message="Failed")
    ready = _cond(st, "Failed")
    assert ready["reason"] == "BackoffLimitExceeded"
    assert "S3 unreachable" in ready["message"]
    assert [a["countsAgainstRetries"] for a in st["attempts"]] == [True, True]
    assert st["retries"] == 2
    assert len(client.BatchV1Api(cluster.api).list_namespaced_job(ns).items) == 2


def test_memory_limit_below_need_is_oomkilled_and_shown(cluster, operator, job_namespace):
    """The kernel enforces the container's memory limit (cgroup): a trainer given 160 MiB
    is OOMKilled, and the FineTuneJob says so."""
    ns = job_namespace
    obj = _job("small", 50, retryPolicy={"maxRetries": 0},
               resources={"memory": "160Mi"})
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(obj))
    st = wait_for(lambda: (s := _status(cluster, ns, "small")).get("phase") == "Failed" and s,
                  timeout=240, message="Failed")
    assert st["attempts"][0]["reason"] == "OOMKilled", st["attempts"]
    assert st["attempts"][0]["countsAgainstRetries"] is True
    assert "memory" in _cond(st, "Failed")["message"]
    pod = client.CoreV1Api(cluster.api).list_namespaced_pod(
        ns, label_selector="kubetune.io/finetunejob=small").items[0]
    term = pod.status.container_statuses[0].state.terminated
    assert term.reason == "OOMKilled" and term.exit_code == 137
    assert pod.spec.containers[0].resources.limits["memory"] == "160Mi"


def test_lost_node_does_not_count_and_the_next_attempt_resumes(cluster, operator, job_namespace):
    """The node's kubelet dies: the node goes NotReady, the admin marks it out of service (the
    non-graceful node shutdown procedure), its pod is failed with a DisruptionTarget
    condition; the attempt does not count, and once the node is back the next attempt
    resumes from the last checkpoint."""
    from kubetune.devcluster.cluster import DevCluster

    ns = job_namespace
    dev = DevCluster(cluster.dir)
    core = client.CoreV1Api(cluster.api)
    obj = _job("nodeloss", 1500, retryPolicy={"maxRetries": 0})
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(obj))
    wait_for(lambda: ((_status(cluster, ns, "nodeloss").get("progress") or {}).get("step") or 0)
             >= 250, timeout=240, interval=0.2, message="past the first checkpoints")
    taint = "node.kubernetes.io/out-of-service=nodeshutdown:NoExecute"
    dev.stop_kubelet()
    try:
        wait_for(lambda: next(c.status for c in core.read_node("real-0").status.conditions
                              if c.type == "Ready") != "True", timeout=120,
                 message="real-0 NotReady")
        cluster.kubectl("taint", "node", "real-0", taint)
        st = wait_for(lambda: (s := _status(cluster, ns, "nodeloss")).get("attempts") and
                      s["attempts"][0].get("reason") == "NodeLost" and s, timeout=120,
                      message="attempt 1 ended NodeLost")
        assert st["attempts"][0]["countsAgainstRetries"] is False
    finally:
        # The taint goes before the node returns: a pod bound the moment it is Ready could
        # otherwise be seen by the taint manager before the taint's removal and be evicted.
        cluster.kubectl("taint", "node", "real-0", f"{taint}-", check=False)
        dev.start_kubelet()
    st = wait_for(lambda: (s := _status(cluster, ns, "nodeloss")).get("phase") in
                  ("Succeeded", "Failed") and s, timeout=400, message="finished")
    assert st["phase"] == "Succeeded", st
    reasons = [a["reason"] for a in st["attempts"]]
    assert reasons[0] == "NodeLost" and reasons[-1] == "Succeeded", st["attempts"]
    assert set(reasons[:-1]) == {"NodeLost"}, st["attempts"]
    assert not any(a["countsAgainstRetries"] for a in st["attempts"][:-1])
    assert st["attempts"][-1]["resumedFromStep"] >= 200  # a checkpoint, not step 0
    assert st["retries"] == 0


def test_two_node_ddp_rendezvous_over_the_headless_service(cluster, operator, job_namespace,
                                                          s3_server, tmp_path):
    """nodes: 2 → an indexed Job of two pods; torchrun's rendezvous finds rank 0 by its DNS
    name under the headless Service; both ranks train (gloo on the CPU) and one artifact is
    published."""
    ns = job_namespace
    obj = _job("ddp", 40, resources={"nodes": 2})
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(obj))
    st = wait_for(lambda: (s := _status(cluster, ns, "ddp")).get("phase") in
                  ("Succeeded", "Failed") and s, timeout=400, message="finished")
    assert st["phase"] == "Succeeded", st
    pods = client.CoreV1Api(cluster.api).list_namespaced_pod(
        ns, label_selector="kubetune.io/finetunejob=ddp").items
    assert len(pods) == 2 and {p.spec.hostname for p in pods} == {"ddp-0-0", "ddp-0-1"}
    assert all(p.status.phase == "Succeeded" for p in pods)
    logs = {p.spec.hostname: client.CoreV1Api(cluster.api).read_namespaced_pod_log(
        p.metadata.name, ns) for p in pods}
    assert '"world_size": 2' in logs["ddp-0-0"], logs["ddp-0-0"][-2000:]  # rank 0 reports
    manifest, _ = artifacts.verify(st["artifact"]["uri"], Storage(
        s3_server.endpoint, access_key=s3_server.access_key, secret_key=s3_server.secret_key),
        tmp_path / "adapter")
    assert manifest["metrics"]["steps"] == 40
