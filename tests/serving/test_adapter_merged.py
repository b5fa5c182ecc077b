"""Merged mode against the real control plane: a merge Job (trainer command on the process node
agent) publishes the merged model, the target Deployment rolls out to it as a new revision, and
a merged model that crashes the server is rolled back automatically."""

from __future__ import annotations

import json

import pytest
from kubernetes import client

from adapterfactory import published
from helpers import wait_for
from kubetune import artifacts
from kubetune.storage import Storage
from servingutil import (adapter, call, complete, condition, create_deployment, events,
                         ready_pods, serve_deployment, wait_condition, wait_ready)

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]
API = ("kubetune.io", "v1alpha1")


def merged(name: str, uri: str, deployment: str) -> dict:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "LoRAAdapter",
            "metadata": {"name": name},
            "spec": {"baseModel": {"uri": "builtin://tiny-llama", "revision": "v1"},
                     "source": {"uri": uri}, "servingName": name, "mode": "Merged",
                     "target": {"deployment": deployment, "container": "server"},
                     "rollout": {"progressDeadlineSeconds": 300}}}


def model_arg(cluster, ns: str, name: str) -> str:
    dep = client.AppsV1Api(cluster.api).read_namespaced_deployment(name, ns)
    args = dep.spec.template.spec.containers[0].args
    return args[args.index("--model") + 1]


@pytest.fixture(scope="module")
def storage(s3_server):
    return Storage(s3_server.endpoint, access_key=s3_server.access_key,
                   secret_key=s3_server.secret_key)


def test_merged_rollout_serves_base_plus_adapter(cluster, operator, job_namespace, storage,
                                                 s3_server, tmp_path):
    ns = job_namespace
    create_deployment(cluster, ns, serve_deployment("srv", 1, endpoint=s3_server.endpoint))
    old = wait_ready(cluster, ns, "srv", 1)[0]
    uri, digest = published(storage, s3_server.bucket, tmp_path, "LoRA", seed=4)
    # What base + adapter answers, hot-swapped (the merged model must answer the same).
    assert call(old["ip"], "/v1/load_lora_adapter", {"lora_name": "ref", "lora_path": uri})[0] \
        == 200
    expected = complete(old["ip"], "ref")
    base_text = complete(old["ip"], "base")
    assert expected != base_text
    call(old["ip"], "/v1/unload_lora_adapter", {"lora_name": "ref"})

    client.CustomObjectsApi(cluster.api).create_namespaced_custom_object(
        *API, ns, "loraadapters", merged("support", uri, "srv"))
    done = wait_condition(cluster, ns, "support", "RolledOut", timeout=300, op=operator)
    st = done["status"]
    assert st["resolvedMode"] == "Merged" and condition(done, "Ready")["status"] == "True"
    assert st["mergedModelUri"] == uri + "-merged"
    assert st["servedRevision"] == "srv@2"
    assert model_arg(cluster, ns, "srv") == uri + "-merged"
    manifest = json.loads(storage.get_bytes(uri + "-merged/manifest.json"))
    assert manifest["adapterSha256"] == digest and manifest["metrics"]["maxLogitDiff"] < 1e-4
    pod = wait_for(lambda: (p := ready_pods(cluster, ns, "srv")) and len(p) == 1 and
                   p[0]["name"] != old["name"] and p[0], timeout=60, message="new pod only")
    assert complete(pod["ip"], "base") == expected
    assert any(e.reason == "Merging" for e in events(cluster, ns, "support"))

    # A second merged adapter (not a version of this one) on the same Deployment does not
    # take it over: one merged model per Deployment, the holder keeps it.
    other_uri, _ = published(storage, s3_server.bucket, tmp_path, "LoRA", seed=6)
    client.CustomObjectsApi(cluster.api).create_namespaced_custom_object(
        *API, ns, "loraadapters", merged("other", other_uri, "srv"))
    blocked = wait_condition(cluster, ns, "other", "Degraded", timeout=60, op=operator)
    assert condition(blocked, "Degraded")["reason"] == "TargetInUse"
    assert "support" in condition(blocked, "Degraded")["message"]
    assert condition(blocked, "Ready")["status"] == "False"
    assert model_arg(cluster, ns, "srv") == uri + "-merged"
    assert condition(adapter(cluster, ns, "support"), "Ready")["status"] == "True"

    # A Git revert (the holder deleted) gives the Deployment its previous model back; then the
    # waiting adapter rolls out, with the original model as the one to roll back to.
    client.CustomObjectsApi(cluster.api).delete_namespaced_custom_object(
        *API, ns, "loraadapters", "support")
    wait_condition(cluster, ns, "other", "RolledOut", timeout=300, op=operator)
    assert model_arg(cluster, ns, "srv") == other_uri + "-merged"
    dep = client.AppsV1Api(cluster.api).read_namespaced_deployment("srv", ns)
    assert dep.metadata.annotations["kubetune.io/previous-model"] == "builtin://tiny-llama"
    assert dep.metadata.annotations["kubetune.io/merged-adapter"] == "other"
    client.CustomObjectsApi(cluster.api).delete_namespaced_custom_object(
        *API, ns, "loraadapters", "other")
    wait_for(lambda: model_arg(cluster, ns, "srv") == "builtin://tiny-llama", timeout=60,
             message="previous model restored")


def test_merged_model_that_crashes_the_server_is_rolled_back(
        cluster, operator, job_namespace, storage, s3_server, tmp_path):
    ns = job_namespace
    create_deployment(cluster, ns, serve_deployment("srv", 1, endpoint=s3_server.endpoint))
    old = wait_ready(cluster, ns, "srv", 1)[0]
    uri, digest = published(storage, s3_server.bucket, tmp_path, "LoRA", seed=5)
    # A merged model that is published (manifest naming this adapter) but cannot load.
    bad = tmp_path / "bad-merged"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "no-such-architecture"}')
    manifest = artifacts.build_manifest(bad, kind="merged-model", method={"type": "LoRA"},
                                        base_model={"uri": "builtin://tiny-llama"},
                                        dataset=None, metrics={},
                                        extra={"adapterSha256": digest})
    artifacts.upload(bad, manifest, uri + "-merged", storage)

    client.CustomObjectsApi(cluster.api).create_namespaced_custom_object(
        *API, ns, "loraadapters", merged("broken", uri, "srv"))
    done = wait_condition(cluster, ns, "broken", "Degraded", timeout=240, op=operator)
    assert condition(done, "Degraded")["reason"] == "RolledBack"
    assert "crash-loops" in condition(done, "Degraded")["message"]
    assert condition(done, "Ready")["status"] == "False"
    assert condition(done, "RolledOut")["status"] == "False"
    assert model_arg(cluster, ns, "srv") == "builtin://tiny-llama"
    wait_for(lambda: (p := ready_pods(cluster, ns, "srv")) and len(p) == 1 and p,
             timeout=120, message="serving on the previous model")
    deployment = client.AppsV1Api(cluster.api).read_namespaced_deployment("srv", ns)
    assert deployment.metadata.annotations["kubetune.io/rolled-back-model"] == uri + "-merged"
    assert any(e.reason == "RolledBack" and e.type == "Warning"
               for e in events(cluster, ns, "broken"))
    assert old["name"] in {p["name"] for p in ready_pods(cluster, ns, "srv")}
