"""Runtime templates on the real apiserver and the operator: a FineTuneJob that names a
ClusterFineTuneRuntime (or a FineTuneRuntime of its namespace) gets its image, placement and
storage from it; a field the runtime locks is refused at admission naming the field (create
and update); a missing runtime leaves the job Pending with RuntimeNotFound until it exists;
a change to the runtime does not reach a job that has started."""

from __future__ import annotations

import secrets

import pytest
import yaml
from kubernetes import client

from helpers import wait_for
from kubetune.devcluster.cluster import kwok_finetunejob

pytestmark = pytest.mark.cluster
GROUP, VERSION = "kubetune.io", "v1alpha1"


def _runtime(kind: str, name: str, image: str, overridable: list[str]) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name},
            "spec": {"resources": {"image": image, "gpusPerNode": 1,
                                   "nodeSelector": {"type": "kwok"},
                                   "tolerations": [{"key": "nvidia.com/gpu",
                                                    "operator": "Exists"}]},
                     "training": {"maxSteps": 7, "learningRate": 0.0003},
                     "overridable": overridable}}


def _job(name: str, runtime: str, kind: str = "ClusterFineTuneRuntime", **spec) -> dict:
    body = kwok_finetunejob(name, f"s3://kubetune/runtimes/{name}")
    body["spec"].pop("resources")
    body["spec"].pop("training")
    body["spec"]["runtimeRef"] = {"kind": kind, "name": runtime}
    body["spec"].update(spec)
    return body


def _status(custom, ns: str, name: str) -> dict:
    return custom.get_namespaced_custom_object(GROUP, VERSION, ns, "finetunejobs",
                                               name).get("status") or {}


@pytest.fixture
def cluster_runtime(cluster, crds):
    custom = client.CustomObjectsApi(cluster.api)
    name = f"rt-{secrets.token_hex(3)}"
    custom.create_cluster_custom_object(GROUP, VERSION, "clusterfinetuneruntimes", _runtime(
        "ClusterFineTuneRuntime", name, "registry.corp/trainer:1",
        ["training.learningRate", "resources.gpusPerNode"]))
    yield name
    custom.delete_cluster_custom_object(GROUP, VERSION, "clusterfinetuneruntimes", name)


def test_locked_fields_are_refused_at_admission_naming_the_field(cluster, namespace,
                                                                 cluster_runtime):
    def refused(obj: dict, verb: str = "create") -> str:
        out = cluster.kubectl(verb, "-n", namespace, "-f", "-", input=yaml.safe_dump(obj),
                              check=False)
        assert out.returncode != 0, out.stdout
        return out.stderr

    # the admission plugin learns of a new runtime (a param) through its informer
    message = wait_for(lambda: (lambda e: e if "locked by" in e else None)(refused(
        _job("img", cluster_runtime, resources={"image": "evil/trainer:1"}))), timeout=30)
    assert f"spec.resources.image: locked by ClusterFineTuneRuntime {cluster_runtime}" in \
        message and "(fields a job may set: training.learningRate, resources.gpusPerNode)" in \
        message
    message = refused(_job("seed", cluster_runtime, training={"seed": 3}))
    assert "spec.training.seed: locked by" in message
    # what the runtime allows is accepted, and a job naming another runtime is not affected
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=yaml.safe_dump(_job(
        "ok", cluster_runtime, training={"learningRate": 0.01},
        scheduling={"suspend": True})))
    other = _job("other", "no-such-runtime", resources={"image": "x/y:1"},
                 scheduling={"suspend": True})
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=yaml.safe_dump(other))
    # update: a locked field added later is refused too
    patch = '{"spec":{"resources":{"nodeSelector":{"pool":"mine"}}}}'
    out = cluster.kubectl("patch", "finetunejob", "ok", "-n", namespace, "--type=merge",
                          "-p", patch, check=False)
    assert out.returncode != 0 and "spec.resources.nodeSelector: locked by" in out.stderr


def test_a_namespaces_runtime_locks_its_jobs(cluster, namespace, crds):
    custom = client.CustomObjectsApi(cluster.api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "finetuneruntimes",
                                           _runtime("FineTuneRuntime", "team", "t/trainer:1",
                                                    ["training"]))
    job = _job("team-job", "team", kind="FineTuneRuntime",
               resources={"gpusPerNode": 2}, scheduling={"suspend": True})
    out = wait_for(lambda: (lambda o: o if o.returncode != 0 else None)(cluster.kubectl(
        "create", "-n", namespace, "-f", "-", input=yaml.safe_dump(job), check=False)),
        timeout=30)
    assert "spec.resources.gpusPerNode: locked by FineTuneRuntime team (fields a job may " \
           "set: training)" in out.stderr


def test_a_job_runs_with_its_runtime_and_keeps_it_once_started(cluster, operator,
                                                               job_namespace, crds):
    ns = job_namespace
    custom = client.CustomObjectsApi(cluster.api)
    batch = client.BatchV1Api(cluster.api)
    name = f"rt-{secrets.token_hex(3)}"
    # the job first: it waits for its runtime, Pending with the reason
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, "finetunejobs", _job(
        "early", name, training={"learningRate": 0.001}))
    st = wait_for(lambda: (s := _status(custom, ns, "early")).get("conditions") and s,
                  timeout=60)
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert st["phase"] == "Pending" and ready["reason"] == "RuntimeNotFound", st
    assert f"ClusterFineTuneRuntime {name} not found" in ready["message"]
    assert not batch.list_namespaced_job(ns).items
    # an admin may allow images by runtime: the operator's policy does not stand in the way
    custom.create_cluster_custom_object(GROUP, VERSION, "clusterfinetuneruntimes", _runtime(
        "ClusterFineTuneRuntime", name, cluster.env["KUBETUNE_TRAINER_IMAGE"] + "-corp",
        ["training.learningRate"]))
    try:
        job = wait_for(lambda: next(iter(batch.list_namespaced_job(ns).items), None),
                       timeout=90, message="the job starts once its runtime exists")
        pod = job.spec.template.spec
        assert pod.containers[0].image == cluster.env["KUBETUNE_TRAINER_IMAGE"] + "-corp"
        assert pod.node_selector == {"type": "kwok"}
        assert any(t.key == "nvidia.com/gpu" for t in pod.tolerations)
        config = yaml.safe_load(job.spec.template.metadata.annotations[
            "kubetune.io/trainer-config"])
        assert config["training"]["maxSteps"] == 7  # the runtime's
        assert config["training"]["learningRate"] == 0.001  # the job's own, allowed
        st = wait_for(lambda: (s := _status(custom, ns, "early")).get("startTime") and s,
                      timeout=60)
        assert st["runtime"]["name"] == name and st["runtime"]["generation"] == 1
        out = cluster.kubectl("get", "finetunejob", "early", "-n", ns)
        assert name in out.stdout.splitlines()[1]  # the Runtime printer column
        # the runtime changes: the started job keeps what it resolved, a new job gets the new
        changed = custom.get_cluster_custom_object(GROUP, VERSION, "clusterfinetuneruntimes",
                                                   name)
        changed["spec"]["training"]["maxSteps"] = 9
        custom.replace_cluster_custom_object(GROUP, VERSION, "clusterfinetuneruntimes", name,
                                             changed)
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, "finetunejobs",
                                               _job("late", name))
        late = wait_for(lambda: next((j for j in batch.list_namespaced_job(ns).items
                                      if j.metadata.name == "late-0"), None), timeout=60)
        assert yaml.safe_load(late.spec.template.metadata.annotations[
            "kubetune.io/trainer-config"])["training"]["maxSteps"] == 9
        custom.patch_namespaced_custom_object(GROUP, VERSION, ns, "finetunejobs", "early",
                                              {"metadata": {"annotations": {"poke": "1"}}})
        st = _status(custom, ns, "early")
        assert st["runtime"]["generation"] == 1
        assert st["runtime"]["values"]["training"]["maxSteps"] == 7
        # the late job's first status comes when its pod runs (or 2 s after its Job)
        late_st = wait_for(lambda: (s := _status(custom, ns, "late")).get("runtime") and s,
                           timeout=30)
        assert late_st["runtime"]["generation"] == 2
    finally:
        custom.delete_cluster_custom_object(GROUP, VERSION, "clusterfinetuneruntimes", name)
