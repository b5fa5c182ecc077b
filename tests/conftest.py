"""Session fixtures: the real control plane (etcd, kube-apiserver, controller manager,
scheduler, KWOK nodes), the real node (kubelet + containerd running the project's images built
from its Dockerfile) and real S3 (SeaweedFS), started once per run.

Nothing here skips: a missing binary, package or toolchain fails the run with a clear message."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import start_operator, stop_operator

from kubetune.devcluster import s3 as s3_mod
from kubetune.devcluster.cluster import DevCluster


@dataclass
class Cluster:
    dir: Path
    kubeconfig: Path
    env: dict[str, str]
    api: object  # kubernetes.client.ApiClient
    s3: s3_mod.S3Info

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the real kubectl (built with the control plane) against this cluster."""
        proc = subprocess.run(["kubectl", *args], input=input, capture_output=True, text=True,
                              env={**os.environ, **self.env}, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc


@pytest.fixture(scope="session")
def s3_server(cluster):
    """The dev cluster's real SeaweedFS S3 (one credentialed identity), on the address where
    both this machine and the real node's pods reach it."""
    return cluster.s3


@pytest.fixture(scope="session")
def s3_client(s3_server):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server.endpoint,
                        aws_access_key_id=s3_server.access_key,
                        aws_secret_access_key=s3_server.secret_key,
                        region_name=s3_server.region)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """The real control plane with KWOK GPU nodes, the real node and S3. The images it runs
    (``KUBETUNE_{OPERATOR,TRAINER,SERVE}_IMAGE``) are exported to the tests' environment."""
    from kubernetes import config

    # KUBETUNE_TEST_CLUSTER=DIR: run against a dev cluster already up in DIR (left running).
    reuse = os.environ.get("KUBETUNE_TEST_CLUSTER")
    dev = DevCluster(Path(reuse) if reuse else tmp_path_factory.mktemp("cluster"))
    if not (reuse and dev.running()):
        reuse = None
        dev.up(progress=lambda msg: print(msg))
    try:
        env = dev.env()
        images = {k: v for k, v in env.items() if k.endswith("_IMAGE")}
        os.environ.update(images)
        api = config.new_client_from_config(config_file=str(dev.kubeconfig))
        yield Cluster(dir=dev.dir, kubeconfig=dev.kubeconfig, env=env, api=api,
                      s3=dev.state().s3_info())
    finally:
        if not reuse:
            dev.down(progress=lambda msg: print(msg))


RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}


@pytest.fixture
def namespace(cluster, request):
    """A fresh namespace per test, enforcing the restricted Pod Security Standard (every pod
    of ours runs non-root on a read-only root filesystem), deleted afterwards."""
    from kubernetes import client

    core = client.CoreV1Api(cluster.api)
    import secrets

    base = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40]
    name = f"t-{base.strip('-')}-{secrets.token_hex(3)}".replace("--", "-")
    core.create_namespace({"metadata": {"name": name, "labels": RESTRICTED}})
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # pods need the namespace's default ServiceAccount
        try:
            core.read_namespaced_service_account("default", name)
            break
        except Exception:  # noqa: BLE001
            time.sleep(0.2)
    yield name
    core.delete_namespace(name)


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def crds(cluster):
    """The checked-in CRDs, applied with kubectl and Established."""
    cluster.kubectl("apply", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    "crd/finetunejobs.kubetune.io", "crd/loraadapters.kubetune.io")
    return ROOT / "crds"


# Faster drift checks than the default 30 s; merge Jobs run on the real node.
OPERATOR_TEST_ENV = {"KUBETUNE_ADAPTER_RESYNC_SECONDS": "2",
                     "KUBETUNE_MERGE_NODE_SELECTOR": '{"kubetune.io/real-node": "true"}'}


@pytest.fixture(scope="session")
def operator(cluster, crds, s3_server, tmp_path_factory):
    """The operator, watching the per-test namespaces (t-*)."""
    op = start_operator(cluster, s3_server, tmp_path_factory.mktemp("operator"),
                        namespaces=["t-*"], extra_env=OPERATOR_TEST_ENV)
    try:
        _wait_until_watching(cluster, op)
    except BaseException:
        stop_operator(op)  # a failed start leaves no operator running
        raise
    yield op
    stop_operator(op)


def _wait_until_watching(cluster, op) -> None:
    """/healthz answers before kopf watches a namespace created after start-up (measured in
    glob mode: ~60 s on a cold machine, once 181 s during a CI run with the real node pulling
    images): wait until an object in a fresh t-* namespace is reconciled, so the first test
    does not spend its budget on the operator's start."""
    import secrets
    import time

    from kubernetes import client

    core, custom = client.CoreV1Api(cluster.api), client.CustomObjectsApi(cluster.api)
    ns = f"t-probe-{secrets.token_hex(3)}"
    core.create_namespace({"metadata": {"name": ns}})
    try:
        custom.create_namespaced_custom_object("kubetune.io", "v1alpha1", ns, "finetunejobs", {
            "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "p" * 51},  # too long: judged InvalidSpec, nothing created
            "spec": {"baseModel": {"uri": "builtin://tiny-llama"},
                     "dataset": {"train": {"uri": "builtin://tiny-chat"}},
                     "method": {"type": "LoRA"}, "output": {"uri": "s3://kubetune/probe"}}})
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            obj = custom.get_namespaced_custom_object("kubetune.io", "v1alpha1", ns,
                                                      "finetunejobs", "p" * 51)
            if (obj.get("status") or {}).get("phase"):
                return
            time.sleep(0.5)
        raise AssertionError(f"the operator reconciled nothing within 420 s:\n{op.tail()}")
    finally:
        core.delete_namespace(ns)


@pytest.fixture
def job_namespace(cluster, namespace, s3_server):
    """A test namespace holding the S3 credentials Secret the operator's default names."""
    from kubernetes import client

    client.CoreV1Api(cluster.api).create_namespaced_secret(namespace, {
        "metadata": {"name": "s3-creds"},
        "stringData": {"AWS_ACCESS_KEY_ID": s3_server.access_key,
                       "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}})
    return namespace
