"""The FineTuneJob controller against the real control plane: scheduling on fake GPU nodes,
Kueue, suspension, invalid specs, TTL, ownership."""

import copy
import json
import time

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from helpers import wait_for

pytestmark = pytest.mark.cluster

BASE = {
    "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
    "metadata": {"name": "ftj"},
    "spec": {
        "baseModel": {"uri": "builtin://tiny-llama", "revision": "v1"},
        "dataset": {"train": {"uri": "builtin://tiny-chat"}, "format": "messages",
                    "maxLength": 128},
        "method": {"type": "LoRA", "lora": {"r": 8}},
        "training": {"maxSteps": 50},
        "resources": {"gpusPerNode": 1, "nodeSelector": {"type": "kwok"}},
        "output": {"uri": "s3://kubetune/ctrl/ftj"},
    },
}


def ftj(name: str, **spec_changes) -> dict:
    obj = copy.deepcopy(BASE)
    obj["metadata"]["name"] = name
    for path, value in spec_changes.items():
        node = obj["spec"]
        keys = path.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return obj


def apply(cluster, namespace, obj):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(obj))


def status(cluster, namespace, name) -> dict:
    return client.CustomObjectsApi(cluster.api).get_namespaced_custom_object(
        "kubetune.io", "v1alpha1", namespace, "finetunejobs", name).get("status") or {}


def condition(st: dict, kind: str) -> dict:
    return next((c for c in st.get("conditions") or [] if c["type"] == kind), {})


def test_one_gpu_job_runs_on_a_fake_gpu_node_with_a_complete_pod_spec(cluster, operator,
                                                                      job_namespace):
    ns = job_namespace
    apply(cluster, ns, ftj("one-gpu"))
    st = wait_for(lambda: (s := status(cluster, ns, "one-gpu")).get("phase") == "Running" and s,
                  message="phase Running")
    assert condition(st, "Running")["status"] == "True"
    assert st["jobName"] == "one-gpu-0" and st["attempts"][0]["number"] == 0

    job = client.BatchV1Api(cluster.api).read_namespaced_job("one-gpu-0", ns)
    job = cluster.api.sanitize_for_serialization(job)
    owner = job["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "FineTuneJob" and owner["name"] == "one-gpu" and owner["controller"]
    pod_spec = job["spec"]["template"]["spec"]
    trainer = pod_spec["containers"][0]
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert trainer["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        pod_spec["tolerations"]
    assert trainer["securityContext"]["allowPrivilegeEscalation"] is False
    assert trainer["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["onPodConditions"][0]["type"] == "DisruptionTarget"
    assert rules[1]["onExitCodes"]["values"] == [2]
    creds = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in trainer["env"]
             if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]}
    assert creds == {"AWS_ACCESS_KEY_ID": "s3-creds", "AWS_SECRET_ACCESS_KEY": "s3-creds"}
    assert not any(e.get("value", "").startswith("kt") for e in trainer["env"])  # no inline keys
    assert pod_spec["serviceAccountName"] == "one-gpu-trainer"
    # the trainer-status policy is installed with the CRDs: the namespace's one RoleBinding,
    # no Role of the job's own (tests/cluster/test_trainer_status_policy.py)
    binding = client.RbacAuthorizationV1Api(cluster.api).read_namespaced_role_binding(
        "kubetune-trainers", ns)
    assert binding.role_ref.name == "kubetune-trainer-status"
    assert not [r for r in client.RbacAuthorizationV1Api(cluster.api).list_namespaced_role(
        ns).items if r.metadata.name == "one-gpu-trainer"]

    annotations = job["spec"]["template"]["metadata"]["annotations"]
    rendered = yaml.safe_load(annotations["kubetune.io/trainer-config"])
    assert rendered["method"]["lora"]["r"] == 8
    assert rendered["logging"]["status"] == {"namespace": ns, "name": "one-gpu", "attempt": 0,
                                             "min_interval_seconds": 2.0}

    pods = client.CoreV1Api(cluster.api).list_namespaced_pod(
        ns, label_selector="kubetune.io/finetunejob=one-gpu").items
    assert pods[0].spec.node_name.startswith("kwok-gpu-")
    events = cluster.kubectl("get", "events", "-n", ns, "-o", "json").stdout
    reasons = {e["reason"] for e in json.loads(events)["items"]}
    assert {"CreatedJob", "Running"} <= reasons


def test_sixteen_gpus_report_unschedulable_with_the_schedulers_message(cluster, operator,
                                                                       job_namespace):
    ns = job_namespace
    apply(cluster, ns, ftj("sixteen", resources__gpusPerNode=16))

    def unschedulable():
        st = status(cluster, ns, "sixteen")
        return condition(st, "Ready").get("reason") == "Unschedulable" and st

    st = wait_for(unschedulable, message="Ready=False Unschedulable")
    assert "Insufficient nvidia.com/gpu" in condition(st, "Ready")["message"]
    assert st["phase"] == "Pending"
    assert condition(st, "Running")["status"] == "False"
    table = cluster.kubectl("get", "ftj", "sixteen", "-n", ns, "-o", "wide").stdout
    assert "Unschedulable" in table


def test_queue_name_adds_kueue_label_and_starts_suspended(cluster, operator, job_namespace):
    ns = job_namespace
    apply(cluster, ns, ftj("queued", scheduling={"queueName": "team-a"}))
    st = wait_for(lambda: (s := status(cluster, ns, "queued")).get("phase") == "Queued" and s,
                  message="phase Queued")
    job = client.BatchV1Api(cluster.api).read_namespaced_job("queued-0", ns)
    assert job.metadata.labels["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job.spec.suspend is True
    assert condition(st, "Ready")["reason"] == "Queued"
    try:
        client.CustomObjectsApi(cluster.api).list_namespaced_custom_object(
            "kueue.x-k8s.io", "v1beta2", ns, "workloads")
    except ApiException as exc:
        assert exc.status == 404, exc
        # No Kueue here (yet: tests/cluster/test_kueue.py installs it later): said so.
        st = wait_for(lambda: (s := status(cluster, ns, "queued")) and "is Kueue installed?"
                      in condition(s, "Ready").get("message", "") and s, timeout=30,
                      message="Ready saying Kueue's Workload API is not served")
        assert "kueue.x-k8s.io/v1beta2" in condition(st, "Ready")["message"]


def test_suspend_and_resume(cluster, operator, job_namespace):
    ns = job_namespace
    apply(cluster, ns, ftj("pausable"))
    wait_for(lambda: status(cluster, ns, "pausable").get("phase") == "Running",
             message="Running")
    cluster.kubectl("patch", "ftj", "pausable", "-n", ns, "--type=merge", "-p",
                    '{"spec": {"scheduling": {"suspend": true}}}')
    st = wait_for(lambda: (s := status(cluster, ns, "pausable")).get("phase") == "Suspended" and s,
                  message="Suspended")
    assert condition(st, "Suspended")["status"] == "True"
    batch = client.BatchV1Api(cluster.api)
    assert batch.read_namespaced_job("pausable-0", ns).spec.suspend is True
    wait_for(lambda: not client.CoreV1Api(cluster.api).list_namespaced_pod(
        ns, label_selector="kubetune.io/finetunejob=pausable").items, message="pod stopped")
    cluster.kubectl("patch", "ftj", "pausable", "-n", ns, "--type=merge", "-p",
                    '{"spec": {"scheduling": {"suspend": false}}}')
    st = wait_for(lambda: (s := status(cluster, ns, "pausable")).get("phase") == "Running" and s,
                  message="Running again")
    assert batch.read_namespaced_job("pausable-0", ns).spec.suspend is False
    assert [a["number"] for a in st["attempts"]] == [0]  # the same attempt resumed


def test_operator_judged_invalid_spec_and_ttl(cluster, operator, job_namespace):
    ns = job_namespace
    long_name = "x" * 51
    apply(cluster, ns, ftj(long_name, ttlSecondsAfterFinished=3))
    st = wait_for(lambda: (s := status(cluster, ns, long_name)).get("phase") == "Failed" and s,
                  message="Failed InvalidSpec")
    ready = condition(st, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert "metadata.name: at most 50 characters" in ready["message"]
    assert ready["observedGeneration"] == 1
    assert not client.BatchV1Api(cluster.api).list_namespaced_job(ns).items  # never retried

    def gone():
        try:
            status(cluster, ns, long_name)
            return False
        except ApiException as exc:
            return exc.status == 404

    wait_for(gone, timeout=30, message="deleted after ttlSecondsAfterFinished")


def test_the_operators_policy_refuses_images_accounts_and_endpoints(cluster, operator,
                                                                  job_namespace):
    """A user who may create FineTuneJobs cannot make the operator run another image, under
    another ServiceAccount, or call an endpoint the admin did not list: refused by field,
    nothing created."""
    ns = job_namespace
    apply(cluster, ns, ftj("greedy", resources__image="registry.example/evil:1",
                           resources__serviceAccountName="admin",
                           output__endpoint="http://169.254.169.254"))
    st = wait_for(lambda: (s := status(cluster, ns, "greedy")).get("phase") == "Failed" and s,
                  message="Failed InvalidSpec")
    ready = condition(st, "Ready")
    assert ready["reason"] == "InvalidSpec"
    for field in ("spec.resources.image", "spec.resources.serviceAccountName",
                  "spec.output.endpoint"):
        assert f"{field}:" in ready["message"] and "policy" in ready["message"], field
    assert not client.BatchV1Api(cluster.api).list_namespaced_job(ns).items


def test_deleting_the_finetunejob_deletes_its_jobs(cluster, operator, job_namespace):
    ns = job_namespace
    apply(cluster, ns, ftj("doomed"))
    wait_for(lambda: status(cluster, ns, "doomed").get("phase") == "Running", message="Running")
    cluster.kubectl("delete", "ftj", "doomed", "-n", ns, "--wait=true")
    batch, core = client.BatchV1Api(cluster.api), client.CoreV1Api(cluster.api)
    wait_for(lambda: not batch.list_namespaced_job(ns).items, message="Jobs garbage-collected")
    wait_for(lambda: not core.list_namespaced_service_account(
        ns, label_selector="kubetune.io/finetunejob=doomed").items,
        message="trainer ServiceAccount gone")


def test_a_look_alike_job_is_never_adopted(cluster, operator, job_namespace):
    """Someone created a Job with the deterministic name and the operator's labels before the
    FineTuneJob: the operator does not adopt it (no attempt, no phase from it), says so in an
    Event, and leaves the Job alone."""
    ns = job_namespace
    labels = {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/managed-by": "kubetune",
              "app.kubernetes.io/component": "trainer", "kubetune.io/finetunejob": "squat",
              "kubetune.io/attempt": "0"}
    batch = client.BatchV1Api(cluster.api)
    batch.create_namespaced_job(ns, {
        "metadata": {"name": "squat-0", "labels": labels},
        "spec": {"suspend": True, "template": {"metadata": {"labels": labels}, "spec": {
            "restartPolicy": "Never", "containers": [{
                "name": "trainer", "image": "registry.example/evil:1",
                "securityContext": {"allowPrivilegeEscalation": False,
                                    "runAsNonRoot": True, "runAsUser": 1000,
                                    "capabilities": {"drop": ["ALL"]},
                                    "seccompProfile": {"type": "RuntimeDefault"}}}]}}}})
    apply(cluster, ns, ftj("squat"))

    def conflict():
        events = client.CoreV1Api(cluster.api).list_namespaced_event(
            ns, field_selector="involvedObject.name=squat").items
        return [e for e in events if e.reason == "ChildConflict"]
    found = wait_for(conflict, timeout=30, message="ChildConflict event")
    assert "not controlled by this object" in found[0].message
    st = status(cluster, ns, "squat")
    assert not st.get("attempts") and st.get("phase") != "Running", st
    assert condition(st, "Ready")["reason"] == "ChildConflict", st
    assert "not controlled by this object" in condition(st, "Ready")["message"]
    job = batch.read_namespaced_job("squat-0", ns)
    assert job.spec.template.spec.containers[0].image == "registry.example/evil:1"
    assert not job.metadata.owner_references


def test_a_job_the_apiserver_refuses_says_why_and_starts_once_allowed(cluster, operator,
                                                                      job_namespace):
    """A ResourceQuota that allows no Jobs (an admission refusal like a policy's): the job says
    why in Ready and one Warning Event, with the apiserver's message; once the quota is gone
    the back-off's next look creates the Job and the job runs."""
    ns = job_namespace
    core = client.CoreV1Api(cluster.api)
    core.create_namespaced_resource_quota(ns, {"metadata": {"name": "no-jobs"},
                                               "spec": {"hard": {"count/jobs.batch": "0"}}})
    wait_for(lambda: (core.read_namespaced_resource_quota("no-jobs", ns).status.hard or {}),
             message="quota observed by the quota controller")
    apply(cluster, ns, ftj("refused"))
    st = wait_for(lambda: (s := status(cluster, ns, "refused")) and
                  condition(s, "Ready").get("reason") == "CreateRefused" and s, timeout=60,
                  message="Ready=False CreateRefused")
    ready = condition(st, "Ready")
    assert ready["status"] == "False" and st["phase"] == "Pending"
    assert "creating Job refused-0 was refused by the apiserver (403)" in ready["message"]
    assert "exceeded quota: no-jobs" in ready["message"]
    assert not client.BatchV1Api(cluster.api).list_namespaced_job(ns).items
    time.sleep(3)  # back-off retries meanwhile: still one Event
    events = [e for e in core.list_namespaced_event(
        ns, field_selector="involvedObject.name=refused").items if e.reason == "CreateRefused"]
    assert len(events) == 1 and events[0].type == "Warning" and events[0].count in (None, 1)
    core.delete_namespaced_resource_quota("no-jobs", ns)
    st = wait_for(lambda: (s := status(cluster, ns, "refused")).get("phase") == "Running" and s,
                  timeout=120, message="Running once the quota is gone")
    assert condition(st, "Ready")["reason"] != "CreateRefused"
    assert [a["number"] for a in st["attempts"]] == [0]


def test_metrics_move_with_reconciles(cluster, operator, job_namespace):
    import re
    import urllib.request

    def scrape() -> str:
        url = f"http://127.0.0.1:{operator.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=5).read().decode()

    def value(text: str, name: str, labels: str) -> float:
        match = re.search(rf"^{name}\{{{labels}\}} (\S+)$", text, flags=re.M)
        return float(match.group(1)) if match else 0.0

    before = scrape()
    ok = 'kind="FineTuneJob",result="success"'
    apply(cluster, job_namespace, ftj("measured"))
    wait_for(lambda: status(cluster, job_namespace, "measured").get("phase") == "Running",
             message="Running")
    after = scrape()
    assert value(after, "kubetune_reconciles_total", ok) > value(
        before, "kubetune_reconciles_total", ok)
    assert value(after, "kubetune_reconcile_duration_seconds_count", 'kind="FineTuneJob"') > 0
    assert value(after, "kubetune_finetunejobs", 'phase="Running"') >= 1
    assert value(after, "kubetune_api_requests_total", 'verb="create"') >= 5
