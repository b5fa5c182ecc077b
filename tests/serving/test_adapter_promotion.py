"""Promotion through Git: versions of one alias replace each other on the target with no
moment without an adapter (polled on /v1/models of every replica), a revert (deleting the new
version, as Argo CD / Flux prune it) restores the previous one, and promotion gates hold an
adapter back until the named condition is True."""

from __future__ import annotations

import threading
import time

import pytest
from kubernetes import client

from adapterfactory import published
from helpers import wait_for
from kubetune.storage import Storage
from servingutil import (adapter, condition, create_deployment, models,
                         serve_deployment, wait_ready)

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]
API = ("kubetune.io", "v1alpha1")


def version(name: str, uri: str, **spec) -> dict:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "LoRAAdapter",
            "metadata": {"name": name},
            "spec": {"baseModel": {"uri": "builtin://tiny-llama", "revision": "v1"},
                     "source": {"uri": uri}, "servingName": name, "alias": "support",
                     "stage": "production", "target": {"deployment": "srv"}, **spec}}


class AliasPoller:
    """Polls /v1/models on every replica as fast as it can; records which versions of the
    alias each replica serves at each moment."""

    def __init__(self, ips: list[str], names: set[str]):
        self.snapshots: list[tuple[str, frozenset]] = []
        self._stop = threading.Event()

        def run():
            while not self._stop.is_set():
                for ip in ips:
                    try:
                        self.snapshots.append((ip, frozenset(models(ip) & names)))
                    except OSError:
                        pass
                time.sleep(0.02)
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def ready(cluster, ns, name):
    a = adapter(cluster, ns, name)
    return condition(a, "Ready").get("status") == "True" and \
        condition(a, "Ready").get("observedGeneration") == a["metadata"]["generation"] and a


def test_new_version_replaces_old_without_a_gap_and_revert_restores_it(
        cluster, operator, job_namespace, s3_server, tmp_path):
    ns = job_namespace
    custom = client.CustomObjectsApi(cluster.api)
    storage = Storage(s3_server.endpoint, access_key=s3_server.access_key,
                      secret_key=s3_server.secret_key)
    create_deployment(cluster, ns, serve_deployment("srv", 2, endpoint=s3_server.endpoint))
    ips = [p["ip"] for p in wait_ready(cluster, ns, "srv", 2)]
    uri1, _ = published(storage, s3_server.bucket, tmp_path, "LoRA", seed=1)
    uri2, _ = published(storage, s3_server.bucket, tmp_path, "LoRA", seed=2)
    uri3, _ = published(storage, s3_server.bucket, tmp_path, "IA3", seed=3)

    custom.create_namespaced_custom_object(*API, ns, "loraadapters", version("support-v1", uri1))
    wait_for(lambda: ready(cluster, ns, "support-v1"), timeout=90, message="v1 Ready")
    assert all(models(ip) == {"support-v1"} for ip in ips)

    names = {"support-v1", "support-v2"}
    poller = AliasPoller(ips, names)
    time.sleep(1)
    custom.create_namespaced_custom_object(*API, ns, "loraadapters", version("support-v2", uri2))
    wait_for(lambda: ready(cluster, ns, "support-v2") and
             all(models(ip) & names == {"support-v2"} for ip in ips), timeout=90,
             message="v2 loaded and v1 unloaded")
    # v1's status is written after its unload: wait for it rather than race it.
    v1 = wait_for(lambda: (a := adapter(cluster, ns, "support-v1")) and
                  condition(a, "Ready").get("reason") == "Superseded" and a, timeout=30,
                  message="v1 Ready=False/Superseded")
    assert condition(v1, "Ready")["reason"] == "Superseded"
    assert "support-v2" in condition(v1, "Ready")["message"]
    assert condition(v1, "Loaded")["status"] == "False"
    assert v1["status"]["replicas"]["loaded"] == 0

    # Revert in Git: v2's manifest is removed, so it is deleted; v1 comes back first.
    custom.delete_namespaced_custom_object(*API, ns, "loraadapters", "support-v2")
    wait_for(lambda: not [a for a in custom.list_namespaced_custom_object(
        *API, ns, "loraadapters")["items"] if a["metadata"]["name"] == "support-v2"],
        timeout=90, message="v2 gone")
    wait_for(lambda: ready(cluster, ns, "support-v1") and
             condition(adapter(cluster, ns, "support-v1"), "Loaded")["status"] == "True",
             timeout=60, message="v1 serving again")
    time.sleep(1)
    poller.stop()
    for ip in ips:
        seen = [s for i, s in poller.snapshots if i == ip]
        assert len(seen) > 20, f"too few polls of {ip}: {len(seen)}"
        assert all(seen), f"{ip} served no version of the alias at some moment"
        assert frozenset({"support-v2"}) in seen and seen[-1] == frozenset({"support-v1"})
        # v2 was served alongside v1 before v1 went (load before unload)
        assert seen.index(frozenset(names)) < seen.index(frozenset({"support-v2"}))

    # A gated version waits for its evaluation gate, then takes over.
    gated = version("support-v3", uri3, promotion={"requires": [
        {"conditionType": "EvalPassed", "object": "LoRAAdapter"}]})
    custom.create_namespaced_custom_object(*API, ns, "loraadapters", gated)
    v3 = wait_for(lambda: (a := adapter(cluster, ns, "support-v3")) and
                  condition(a, "Promoted").get("reason") == "GatesPending" and a, timeout=60,
                  message="v3 held by its gate")
    assert "EvalPassed" in condition(v3, "Promoted")["message"]
    time.sleep(3)
    assert all(models(ip) & {"support-v1", "support-v3"} == {"support-v1"} for ip in ips)
    conds = v3["status"]["conditions"] + [{
        "type": "EvalPassed", "status": "True", "reason": "EvalLossWithinGate",
        "message": "recorded by the evaluation pipeline", "lastTransitionTime":
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]
    custom.patch_namespaced_custom_object_status(
        *API, ns, "loraadapters", "support-v3",
        {"metadata": {"resourceVersion": v3["metadata"]["resourceVersion"]},
         "status": {"conditions": conds}})
    wait_for(lambda: ready(cluster, ns, "support-v3") and
             all(models(ip) & {"support-v1", "support-v3"} == {"support-v3"} for ip in ips),
             timeout=90, message="v3 promoted")
    final = adapter(cluster, ns, "support-v3")
    assert condition(final, "EvalPassed")["status"] == "True"  # kept by the operator
    assert condition(final, "Promoted")["status"] == "True"


def test_promotion_to_another_target_moves_the_adapter(cluster, operator, job_namespace,
                                                       s3_server, tmp_path):
    """Promotion as a Git change of spec.stage/spec.target: candidate on the staging
    Deployment → production Deployment; it is unloaded from staging once there."""
    ns = job_namespace
    custom = client.CustomObjectsApi(cluster.api)
    storage = Storage(s3_server.endpoint, access_key=s3_server.access_key,
                      secret_key=s3_server.secret_key)
    for name in ("staging", "prod"):
        create_deployment(cluster, ns, serve_deployment(name, 1, endpoint=s3_server.endpoint))
    staging = wait_ready(cluster, ns, "staging", 1)[0]["ip"]
    prod = wait_ready(cluster, ns, "prod", 1)[0]["ip"]
    uri, _ = published(storage, s3_server.bucket, tmp_path, "LoRA", seed=6)
    obj = version("sql-v1", uri)
    obj["spec"].update(stage="candidate", target={"deployment": "staging"})
    custom.create_namespaced_custom_object(*API, ns, "loraadapters", obj)
    wait_for(lambda: ready(cluster, ns, "sql-v1") and "sql-v1" in models(staging),
             timeout=90, message="candidate on staging")
    custom.patch_namespaced_custom_object(*API, ns, "loraadapters", "sql-v1", {
        "spec": {"stage": "production", "target": {"deployment": "prod"}}})
    wait_for(lambda: ready(cluster, ns, "sql-v1") and "sql-v1" in models(prod) and
             "sql-v1" not in models(staging), timeout=90, message="moved to production")
    a = adapter(cluster, ns, "sql-v1")
    assert a["status"]["servedTarget"] == "prod" and a["status"]["observedGeneration"] == 2
