"""The trainer-status admission policy on the real apiserver (kubetune/api/trainerstatus.py):
with one RoleBinding for the whole namespace, a job's trainer (real ServiceAccount tokens)
may patch its own job's progress and nothing else; any other account of the namespace, another
job's trainer included, is refused with a message naming the job. And the operator, finding
the policy, gives a job only its ServiceAccount (no Role, no RoleBinding of its own)."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request

import pytest
import yaml
from kubernetes import client

from helpers import wait_for
from kubetune.api import trainerstatus

pytestmark = pytest.mark.cluster


def _ftj(name: str) -> dict:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name},
            "spec": {"baseModel": {"uri": "builtin://tiny-llama"},
                     "dataset": {"train": {"uri": "builtin://tiny-chat"}},
                     "method": {"type": "LoRA"}, "training": {"maxSteps": 1},
                     "output": {"uri": "s3://kubetune/never"},
                     # no operator acts on these: suspended, they would stay so anyway
                     "scheduling": {"suspend": True}}}


def _patch(cluster, token: str, ns: str, name: str, status: dict) -> tuple[int, str]:
    server = yaml.safe_load(open(cluster.kubeconfig))["clusters"][0]["cluster"]
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the dev cluster's own CA; the token is what is tested
    request = urllib.request.Request(
        f"{server['server']}/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs/{name}"
        f"/status", data=json.dumps({"status": status}).encode(), method="PATCH",
        headers={"Content-Type": "application/merge-patch+json",
                 "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _create(create, namespace: str, body: dict) -> None:
    try:
        create(namespace, body)
    except client.ApiException as exc:
        if exc.status != 409:
            raise


def test_a_trainer_writes_only_its_own_jobs_progress(cluster, crds, namespace):
    core = client.CoreV1Api(cluster.api)
    custom = client.CustomObjectsApi(cluster.api)
    rbac = client.RbacAuthorizationV1Api(cluster.api)
    for name in ("a", "b"):
        custom.create_namespaced_custom_object("kubetune.io", "v1alpha1", namespace,
                                               "finetunejobs", _ftj(name))
    # an operator watching every namespace may have made the trainers' accounts and the
    # binding already (the jobs are suspended, nothing runs): the same objects either way
    for account in ("a-trainer", "b-trainer", "builder"):
        _create(core.create_namespaced_service_account, namespace,
                {"metadata": {"name": account}})
    _create(rbac.create_namespaced_role_binding, namespace,
            trainerstatus.namespace_binding(namespace))

    def token(account: str) -> str:
        return core.create_namespaced_service_account_token(
            account, namespace, {"spec": {"expirationSeconds": 600}}).status.token

    a, b, builder = token("a-trainer"), token("b-trainer"), token("builder")
    progress = {"progress": {"step": 3, "totalSteps": 10}}
    # RBAC bindings reach the authorizer through its informer: the first allowed patch waits
    code, body = wait_for(lambda: (lambda r: r if r[0] == 200 else None)(
        _patch(cluster, a, namespace, "a", progress)), timeout=30)
    got = custom.get_namespaced_custom_object("kubetune.io", "v1alpha1", namespace,
                                              "finetunejobs", "a")
    assert got["status"]["progress"]["step"] == 3

    # the admission plugin learns of a new policy through its informer too
    code, body = wait_for(lambda: (lambda r: r if r[0] != 200 else None)(
        _patch(cluster, a, namespace, "b", progress)), timeout=30)
    assert code == 403 and "may not write the status of FineTuneJob b" in body, body
    assert "b-trainer" in body
    code, body = _patch(cluster, builder, namespace, "a", progress)
    assert code == 403 and f"system:serviceaccount:{namespace}:builder" in body, body
    # its own job, but more than progress: the operator's record is not the trainer's to write
    for forged in ({"phase": "Succeeded"}, {"artifact": {"uri": "s3://evil/x"}},
                   {"conditions": [{"type": "Ready", "status": "True", "reason": "X",
                                    "message": "", "lastTransitionTime":
                                    "2026-01-01T00:00:00Z"}]}):
        code, body = _patch(cluster, a, namespace, "a", {**progress, **forged})
        assert code == 403 and "may change only status.progress" in body, (forged, body)
    code, _ = _patch(cluster, b, namespace, "b", progress)
    assert code == 200
    got = custom.get_namespaced_custom_object("kubetune.io", "v1alpha1", namespace,
                                              "finetunejobs", "b")
    assert got["status"]["progress"]["step"] == 3
    got = custom.get_namespaced_custom_object("kubetune.io", "v1alpha1", namespace,
                                              "finetunejobs", "a")
    assert got["status"].get("phase") != "Succeeded" and "artifact" not in got["status"]


def test_with_the_policy_the_operator_gives_a_job_only_its_account(cluster, job_namespace,
                                                                   operator):
    from kubetune.devcluster.cluster import kwok_finetunejob

    custom = client.CustomObjectsApi(cluster.api)
    for name in ("p", "q"):
        custom.create_namespaced_custom_object(
            "kubetune.io", "v1alpha1", job_namespace, "finetunejobs",
            kwok_finetunejob(name, f"s3://kubetune/policy/{name}"))
    batch = client.BatchV1Api(cluster.api)
    wait_for(lambda: len(batch.list_namespaced_job(job_namespace).items) == 2, timeout=60)
    rbac = client.RbacAuthorizationV1Api(cluster.api)
    roles = [r.metadata.name for r in rbac.list_namespaced_role(job_namespace).items]
    bindings = [r.metadata.name for r in rbac.list_namespaced_role_binding(job_namespace).items]
    assert not [r for r in roles if r.endswith("-trainer")]
    assert bindings.count(trainerstatus.NAMESPACE_BINDING) == 1
    assert not [b for b in bindings if b.endswith("-trainer")]
    accounts = {s.metadata.name for s in
                client.CoreV1Api(cluster.api).list_namespaced_service_account(
                    job_namespace).items}
    assert {"p-trainer", "q-trainer"} <= accounts
    assert '"trainer_rbac": "shared"' in operator.log.read_text()
