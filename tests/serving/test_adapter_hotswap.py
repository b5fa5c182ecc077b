"""LoRAAdapter hot-swap against the real control plane: `kubetune serve` replicas (the `serve`
image) on the real node; the operator loads the adapter on every replica and keeps per-replica
truth through restarts, scale-out, drift and deletion."""

from __future__ import annotations

import secrets
import threading

import pytest
from kubernetes import client, watch

from adapterfactory import published
from helpers import wait_for
from kubetune.storage import Storage
from servingutil import (adapter, complete, condition, create_deployment, events, image,
                         models, ready_pods, serve_deployment, wait_condition, wait_ready)

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]


@pytest.fixture(scope="module")
def storage(s3_server):
    return Storage(s3_server.endpoint, access_key=s3_server.access_key,
                   secret_key=s3_server.secret_key)


def lora_adapter(name: str, uri: str, deployment: str, **spec) -> dict:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "LoRAAdapter",
            "metadata": {"name": name},
            "spec": {"baseModel": {"uri": "builtin://tiny-llama", "revision": "v1"},
                     "source": {"uri": uri}, "servingName": name,
                     "target": {"deployment": deployment, "runtime": "kubetune"}, **spec}}


def apply(cluster, ns: str, obj: dict) -> None:
    client.CustomObjectsApi(cluster.api).create_namespaced_custom_object(
        "kubetune.io", "v1alpha1", ns, "loraadapters", obj)


class StatusRecorder:
    """Every loadedReplicas value the adapter's status takes, read from a watch."""

    def __init__(self, cluster, ns: str, name: str):
        self.values: list[str] = []
        self._stop = threading.Event()
        self._w = watch.Watch()
        api = client.CustomObjectsApi(cluster.api)

        def run():
            try:
                self._stream(api, ns, name)
            except Exception:  # noqa: BLE001 - stop() cuts the stream
                if not self._stop.is_set():
                    raise
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def _stream(self, api, ns, name):
        for ev in self._w.stream(api.list_namespaced_custom_object, "kubetune.io", "v1alpha1",
                                 ns, "loraadapters", field_selector=f"metadata.name={name}",
                                 timeout_seconds=300):
            value = (ev["object"].get("status") or {}).get("loadedReplicas")
            if value and (not self.values or self.values[-1] != value):
                self.values.append(value)
            if self._stop.is_set():
                return

    def stop(self):
        self._stop.set()
        self._w.stop()


def test_hot_swap_per_replica_truth_restart_scale_drift_delete(
        cluster, operator, job_namespace, storage, s3_server, tmp_path):
    ns = job_namespace
    create_deployment(cluster, ns, serve_deployment("srv", 2, endpoint=s3_server.endpoint))
    pods = wait_ready(cluster, ns, "srv", 2)
    base_text = complete(pods[0]["ip"], "base")
    uri, digest = published(storage, s3_server.bucket, tmp_path, "LoRA", seed=7)
    apply(cluster, ns, lora_adapter("support", uri, "srv", source={"uri": uri, "sha256": digest}))

    done = wait_condition(cluster, ns, "support", "Ready", timeout=120, op=operator)
    st = done["status"]
    assert st["replicas"] == {"desired": 2, "loaded": 2, "failed": 0}
    assert st["loadedReplicas"] == "2/2" and st["observedGeneration"] == 1
    assert condition(done, "ArtifactVerified")["reason"] == "Verified"
    assert st["artifact"]["manifestSha256"] == digest and st["resolvedMode"] == "HotSwap"
    assert st["servedRevision"] == f"sha256:{digest}"
    assert "kubetune.io/adapter-unload" in done["metadata"]["finalizers"]
    assert "probe" in condition(done, "Loaded")["message"]  # verified by behaviour too
    for pod in pods:
        assert "support" in models(pod["ip"])
        assert complete(pod["ip"], "support") != base_text
        assert any(e.reason == "BehaviourVerified" and pod["name"] in e.message
                   for e in events(cluster, ns, "support"))
    # /metrics: adapters loaded per target, LoRAAdapter reconciles.
    import re
    import urllib.request
    text = urllib.request.urlopen(
        f"http://127.0.0.1:{operator.metrics_port}/metrics").read().decode()
    loaded = re.search(r'kubetune_adapter_replicas\{namespace="%s",state="loaded",'
                       r'target="srv"\} (\S+)' % ns, text)
    assert loaded and float(loaded.group(1)) == 2.0, text[-2000:]
    reconciles = re.search(r'kubetune_reconciles_total\{kind="LoRAAdapter",result="success"\}'
                           r' (\S+)', text)
    assert reconciles and float(reconciles.group(1)) > 0

    # Restart a replica: the replacement gets the adapter without any user action, and
    # status shows the dip and the recovery.
    recorder = StatusRecorder(cluster, ns, "support")
    victim = pods[0]["name"]
    client.CoreV1Api(cluster.api).delete_namespaced_pod(victim, ns)
    wait_for(lambda: (p := ready_pods(cluster, ns, "srv")) and len(p) == 2 and
             victim not in {x["name"] for x in p}, timeout=120, message="replacement pod")
    wait_for(lambda: adapter(cluster, ns, "support")["status"]["loadedReplicas"] == "2/2" and
             all("support" in models(p["ip"]) for p in ready_pods(cluster, ns, "srv")),
             timeout=60, message="adapter back on 2/2")
    recorder.stop()
    assert "1/2" in recorder.values and recorder.values[-1] == "2/2", recorder.values
    new_pod = next(p for p in ready_pods(cluster, ns, "srv") if p["name"] != pods[1]["name"])
    assert any(e.reason == "LoadedOnReplica" and new_pod["name"] in e.message
               for e in events(cluster, ns, "support"))

    # Scale 2 -> 3: the new replica gets the adapter.
    client.AppsV1Api(cluster.api).patch_namespaced_deployment_scale(
        "srv", ns, {"spec": {"replicas": 3}})
    wait_ready(cluster, ns, "srv", 3)
    wait_for(lambda: adapter(cluster, ns, "support")["status"]["replicas"] ==
             {"desired": 3, "loaded": 3, "failed": 0}, timeout=60, message="3/3")
    assert all("support" in models(p["ip"]) for p in ready_pods(cluster, ns, "srv"))

    # Drift: a replica loses the adapter behind the operator's back; it is repaired.
    drifted = ready_pods(cluster, ns, "srv")[1]
    from servingutil import call
    assert call(drifted["ip"], "/v1/unload_lora_adapter", {"lora_name": "support"})[0] == 200
    wait_for(lambda: "support" in models(drifted["ip"]), timeout=30, message="drift repaired")

    # Delete: unloaded from every replica before the object goes (finalizer).
    client.CustomObjectsApi(cluster.api).delete_namespaced_custom_object(
        "kubetune.io", "v1alpha1", ns, "loraadapters", "support")
    wait_for(lambda: all("support" not in models(p["ip"])
                         for p in ready_pods(cluster, ns, "srv")), timeout=60,
             message="unloaded everywhere")
    wait_for(lambda: not client.CustomObjectsApi(cluster.api).list_namespaced_custom_object(
        "kubetune.io", "v1alpha1", ns, "loraadapters")["items"], timeout=30,
        message="adapter deleted")


def test_corrupted_artifact_and_rank_above_max_load_nothing(
        cluster, operator, job_namespace, storage, s3_server, tmp_path):
    ns = job_namespace
    create_deployment(cluster, ns, serve_deployment("srv", 1, endpoint=s3_server.endpoint))
    pods = wait_ready(cluster, ns, "srv", 1)
    uri, _ = published(storage, s3_server.bucket, tmp_path, "LoRA", seed=1)
    key = uri.removeprefix(f"s3://{s3_server.bucket}/") + "/adapter_model.safetensors"
    data = bytearray(storage.s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01  # one byte changed, same size
    storage.s3.put_object(Bucket=s3_server.bucket, Key=key, Body=bytes(data))
    apply(cluster, ns, lora_adapter("corrupt", uri, "srv"))
    wide_uri, _ = published(storage, s3_server.bucket, tmp_path, "LoRA", rank=32)
    apply(cluster, ns, lora_adapter("wide", wide_uri, "srv",
                                    compatibility={"maxRank": 16}))

    bad = wait_condition(cluster, ns, "corrupt", "ArtifactVerified", "False", timeout=60,
                         op=operator)
    verified = condition(bad, "ArtifactVerified")
    assert verified["reason"] == "DigestMismatch"
    assert "adapter_model.safetensors" in verified["message"]
    assert condition(bad, "Ready")["status"] == "False"
    assert condition(bad, "Degraded")["status"] == "True"
    wide = wait_condition(cluster, ns, "wide", "Compatible", "False", timeout=60, op=operator)
    assert condition(wide, "Compatible")["reason"] == "RankTooHigh"
    assert "32" in condition(wide, "Compatible")["message"]
    assert condition(wide, "ArtifactVerified")["status"] == "True"
    assert any(e.reason == "RankTooHigh" and e.type == "Warning"
               for e in events(cluster, ns, "wide"))
    # Several resyncs later, still nothing is loaded anywhere.
    import time
    time.sleep(5)
    assert models(pods[0]["ip"]) == set()


def test_a_replica_that_does_not_behave_as_the_manifest_says_is_failed(
        cluster, operator, job_namespace, storage, s3_server, tmp_path):
    """The replica accepts and lists the adapter, but its answer to the manifest's probe is not
    the trained model's (here: the manifest carries a sibling adapter's probe, as if the engine
    applied the wrong weights): BehaviourMismatch, not Ready; with the check off it is Ready."""
    ns = job_namespace
    create_deployment(cluster, ns, serve_deployment("srv", 1, endpoint=s3_server.endpoint))
    pod = wait_ready(cluster, ns, "srv", 1)[0]
    uri, _ = published(storage, s3_server.bucket, tmp_path, "LoRA", seed=11,
                       probe_of="seed+1")
    apply(cluster, ns, lora_adapter("liar", uri, "srv",
                                    compatibility={"probeTolerance": 0.01}))
    bad = wait_condition(cluster, ns, "liar", "Degraded", "True", timeout=120, op=operator)
    st = bad["status"]
    assert "liar" in models(pod["ip"])  # listed by the API: the old check would say Loaded
    assert st["replicas"] == {"desired": 1, "loaded": 0, "failed": 1}, st
    assert st["failures"][0]["reason"] == "BehaviourMismatch" and \
        st["failures"][0]["pod"] == pod["name"]
    assert "tolerance 0.01" in st["failures"][0]["message"]
    assert condition(bad, "Ready")["status"] == "False"
    assert any(e.reason == "BehaviourMismatch" and e.type == "Warning"
               for e in events(cluster, ns, "liar"))
    # Checked once per load, not on every resync: the verdict stays, nothing is reloaded.
    import time
    time.sleep(4)
    assert sum(e.reason == "BehaviourMismatch" for e in events(cluster, ns, "liar")) == 1
    assert sum(e.reason == "LoadedOnReplica" for e in events(cluster, ns, "liar")) == 1
    client.CustomObjectsApi(cluster.api).patch_namespaced_custom_object(
        "kubetune.io", "v1alpha1", ns, "loraadapters", "liar",
        {"spec": {"compatibility": {"verifyBehaviour": False}}})
    ok = wait_condition(cluster, ns, "liar", "Ready", timeout=60, op=operator)
    assert ok["status"]["replicas"] == {"desired": 1, "loaded": 1, "failed": 0}


def test_vllm_runtime_loads_from_the_sidecar_synced_volume(
        cluster, operator, job_namespace, storage, s3_server, tmp_path):
    """runtime vllm: the operator has the adapter-sync sidecar copy the verified artifact into
    the shared volume, then calls the engine's load API with that folder. vLLM cannot run here
    (no GPU): the engine container is `kubetune serve`, a STAND-IN speaking the same runtime
    LoRA API and loading from local folders the way vLLM does. Both containers require the API
    key from a Secret, which the operator reads through spec.target.apiKeySecret."""
    ns = job_namespace
    key = "k-" + secrets.token_hex(12)
    client.CoreV1Api(cluster.api).create_namespaced_secret(ns, {
        "metadata": {"name": "engine-key"}, "stringData": {"API_KEY": key}})
    body = serve_deployment("vllm", 1, endpoint=s3_server.endpoint)
    pod = body["spec"]["template"]["spec"]
    engine = pod["containers"][0]
    engine["env"].append({"name": "KUBETUNE_API_KEY", "valueFrom": {
        "secretKeyRef": {"name": "engine-key", "key": "API_KEY"}}})
    engine["volumeMounts"].append({"name": "adapters", "mountPath": "/adapters"})
    sidecar = {"name": "adapter-sync", "image": image("trainer"),  # python -m kubetune_trainer
               "args": ["adapter-sync", "--dir", "/adapters", "--host", "$(POD_IP)",
                        "--port", "8090"],
               "env": engine["env"], "securityContext": engine["securityContext"],
               "volumeMounts": [{"name": "adapters", "mountPath": "/adapters"},
                                {"name": "tmp", "mountPath": "/tmp"}]}
    pod["containers"].append(sidecar)
    pod["volumes"].append({"name": "adapters", "emptyDir": {}})
    create_deployment(cluster, ns, body)
    ip = wait_ready(cluster, ns, "vllm", 1)[0]["ip"]
    uri, digest = published(storage, s3_server.bucket, tmp_path, "LoRA", seed=9)
    keyed = {"apiKeySecret": {"name": "engine-key"}}
    apply(cluster, ns, {**lora_adapter("sql", uri, "vllm"), "spec": {
        **lora_adapter("sql", uri, "vllm")["spec"],
        "target": {"deployment": "vllm", "runtime": "vllm", "syncPort": 8090, **keyed}}})
    ia3_uri, _ = published(storage, s3_server.bucket, tmp_path, "IA3", seed=9)
    apply(cluster, ns, {**lora_adapter("ia3", ia3_uri, "vllm"), "spec": {
        **lora_adapter("ia3", ia3_uri, "vllm")["spec"], "mode": "HotSwap",
        "target": {"deployment": "vllm", "runtime": "vllm", **keyed}}})
    ready = wait_condition(cluster, ns, "sql", "Ready", timeout=90, op=operator)
    assert ready["status"]["loadedReplicas"] == "1/1"
    from servingutil import call
    # without the key neither container answers an admin route
    assert call(ip, "/v1/models", timeout=10)[0] == 401
    assert call(f"http://{ip}:8090", "/v1/sync", {"uri": uri, "sha256": digest,
                                                  "path": "/adapters/x"}, timeout=10)[0] == 401
    listed = {m["id"]: m["root"] for m in call(ip, "/v1/models", key=key)[1]["data"]}
    assert listed["sql"] == f"/adapters/sql-{digest[:12]}"  # a local folder, like vLLM needs
    bad = wait_condition(cluster, ns, "ia3", "Compatible", "False", timeout=60, op=operator)
    assert condition(bad, "Compatible")["reason"] == "MethodNotServable"
    assert "ia3" not in {m["id"] for m in call(ip, "/v1/models", key=key)[1]["data"]}


def test_a_missing_api_key_secret_never_blocks_deletion(cluster, operator, job_namespace):
    """The apiKeySecret is gone (deleted first, as a namespace deletion may do): the adapter
    says so while it lives, and its finalizer is still released when it is deleted, so neither
    the adapter nor its namespace is stuck Terminating."""
    ns = job_namespace
    custom = client.CustomObjectsApi(cluster.api)
    obj = lora_adapter("orphan", "s3://kubetune/none/adapter", "absent")
    obj["spec"]["target"]["apiKeySecret"] = {"name": "gone"}
    apply(cluster, ns, obj)
    seen = wait_condition(cluster, ns, "orphan", "Loaded", "False", timeout=60, op=operator)
    assert "kubetune.io/adapter-unload" in seen["metadata"]["finalizers"]
    custom.delete_namespaced_custom_object("kubetune.io", "v1alpha1", ns, "loraadapters",
                                           "orphan")

    def gone():
        try:
            custom.get_namespaced_custom_object("kubetune.io", "v1alpha1", ns, "loraadapters",
                                                "orphan")
            return False
        except client.ApiException as exc:
            return exc.status == 404
    wait_for(gone, timeout=60, message="the adapter released its finalizer")


def test_a_target_must_opt_in_and_a_source_endpoint_must_be_allowed(
        cluster, operator, job_namespace, storage, s3_server, tmp_path):
    """The operator changes only Deployments labelled kubetune.io/adapter-target: "true", and
    calls only S3 endpoints its policy lists: a LoRAAdapter says which rule refused it."""
    ns = job_namespace
    body = serve_deployment("plain", 0, endpoint=s3_server.endpoint)
    del body["metadata"]["labels"]["kubetune.io/adapter-target"]
    create_deployment(cluster, ns, body)
    uri, _ = published(storage, s3_server.bucket, tmp_path, "LoRA", seed=4)
    apply(cluster, ns, lora_adapter("uninvited", uri, "plain"))
    refused = wait_condition(cluster, ns, "uninvited", "Loaded", "False", timeout=60,
                             op=operator)
    loaded = condition(refused, "Loaded")
    assert loaded["reason"] == "TargetNotOptedIn", loaded
    assert "kubetune.io/adapter-target" in loaded["message"]
    dep = client.AppsV1Api(cluster.api).read_namespaced_deployment("plain", ns)
    assert not (dep.metadata.annotations or {}).get("kubetune.io/adapter")

    elsewhere = lora_adapter("elsewhere", uri, "plain")
    elsewhere["spec"]["source"]["endpoint"] = "http://169.254.169.254"
    apply(cluster, ns, elsewhere)
    denied = wait_condition(cluster, ns, "elsewhere", "ArtifactVerified", "False", timeout=60,
                            op=operator)
    verified = condition(denied, "ArtifactVerified")
    assert verified["reason"] == "PolicyDenied" and "spec.source.endpoint" in \
        verified["message"]
