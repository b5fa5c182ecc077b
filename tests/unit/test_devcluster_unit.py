"""Pure parts of the dev cluster: node manifests, toolchain errors, the real node's
configuration."""

import pytest

from kubetune.devcluster import toolchain
from kubetune.devcluster.cluster import GPU_TAINT, kwok_nodes, node_manifest

pytestmark = pytest.mark.unit


def test_gpu_nodes_are_a_tainted_labelled_pool():
    nodes = {n.name: node_manifest(n) for n in kwok_nodes()}
    gpu = nodes["kwok-gpu-0"]
    assert gpu["status"]["capacity"]["nvidia.com/gpu"] == "8"
    assert gpu["spec"]["taints"] == [GPU_TAINT]
    assert gpu["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
    assert "nvidia.com/gpu" not in nodes["kwok-cpu-0"]["status"]["capacity"]


def test_missing_go_toolchain_is_a_clear_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert set(toolchain.missing()) == set(toolchain.ALL_TOOLS)
    with pytest.raises(toolchain.ToolchainError, match="the Go toolchain is missing"):
        toolchain.ensure_built()
    with pytest.raises(toolchain.ToolchainError, match="kube-apiserver .* is not built"):
        toolchain.binary("kube-apiserver")


def test_versions_are_pinned_and_cache_is_keyed_by_version(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path))
    path = toolchain.tool("kube-apiserver").path
    assert path == tmp_path / "bin" / f"kube-apiserver-{toolchain.KUBERNETES_VERSION}" / \
        "kube-apiserver"
    assert toolchain.KUBERNETES_VERSION.startswith("v1.")
