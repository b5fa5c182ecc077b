"""The dev cluster's nodes and the real scheduler's verdicts on GPU requests."""

import json

import pytest
from kubernetes import client

from helpers import wait_for

pytestmark = pytest.mark.cluster


def test_kubectl_lists_fake_gpu_nodes_with_gpu_capacity(cluster):
    out = cluster.kubectl("get", "nodes", "-o", "json").stdout
    nodes = {n["metadata"]["name"]: n for n in json.loads(out)["items"]}
    gpu_nodes = [n for n in nodes.values() if n["status"]["capacity"].get("nvidia.com/gpu") == "8"]
    assert {"kwok-gpu-0", "kwok-gpu-1", "real-0"} <= {n["metadata"]["name"] for n in gpu_nodes}
    real = nodes["real-0"]  # its GPUs are a stand-in (extended resources), and say so
    assert real["metadata"]["labels"]["kubetune.io/gpu-stand-in"] == "true"
    assert real["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    for node in gpu_nodes:  # labelled and tainted like a GPU pool
        assert node["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in \
            node["spec"]["taints"]
    assert "nvidia.com/gpu" not in nodes["kwok-cpu-0"]["status"]["capacity"]
    table = cluster.kubectl("get", "nodes").stdout
    assert "kwok-gpu-0" in table and "Ready" in table


def _gpu_pod(name: str, gpus: int) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {
        "nodeSelector": {"type": "kwok", "kubetune.io/pool": "gpu"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65532,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "train", "image": "trainer:dev",
                        "securityContext": {"allowPrivilegeEscalation": False,
                                            "capabilities": {"drop": ["ALL"]}},
                        "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]}}


def test_scheduler_binds_one_gpu_and_refuses_sixteen(cluster, namespace):
    core = client.CoreV1Api(cluster.api)
    core.create_namespaced_pod(namespace, _gpu_pod("one-gpu", 1))
    core.create_namespaced_pod(namespace, _gpu_pod("sixteen-gpus", 16))

    bound = wait_for(lambda: core.read_namespaced_pod("one-gpu", namespace).spec.node_name,
                     message="1-GPU pod bound")
    assert bound.startswith("kwok-gpu-")

    def unschedulable():
        pod = core.read_namespaced_pod("sixteen-gpus", namespace)
        return next((c for c in pod.status.conditions or []
                     if c.type == "PodScheduled" and c.reason == "Unschedulable"), None)

    cond = wait_for(unschedulable, message="16-GPU pod Unschedulable")
    assert cond.status == "False"
    assert "Insufficient nvidia.com/gpu" in cond.message
    pod = core.read_namespaced_pod("sixteen-gpus", namespace)
    assert pod.status.phase == "Pending" and pod.spec.node_name is None
