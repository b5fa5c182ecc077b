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


def test_real_node_network_reaches_this_machine_only(tmp_path):
    """The pod network: a bridge with no masquerade and no default route (pods reach the pod
    range, Services and the host's cluster address, nothing off the machine)."""
    import json

    from kubetune.devcluster import realnode

    net = realnode.NodeNet(42)
    assert (net.host_ip, net.node_ip, net.pod_cidr) == ("10.250.42.1", "10.250.42.2",
                                                        "10.246.42.0/24")
    (tmp_path / "cni" / "net.d").mkdir(parents=True)
    realnode.write_cni_config(tmp_path, net)
    bridge = json.loads((tmp_path / "cni" / "net.d" / "10-kubetune.conflist").read_text())[
        "plugins"][0]
    assert bridge["ipMasq"] is False
    routes = [r["dst"] for r in bridge["ipam"]["routes"]]
    assert "0.0.0.0/0" not in routes and routes == [realnode.SERVICE_CIDR, net.link_cidr]


def test_real_node_leaves_global_kernel_settings_alone(tmp_path):
    """kube-proxy's conntrack limits are global: zero means "leave them"; containerd must not
    lower oom_score_adj (this machine withholds CAP_SYS_RESOURCE)."""
    import json

    from kubetune.devcluster import realnode

    net = realnode.NodeNet(7)
    proxy = json.loads(realnode.write_kube_proxy_config(tmp_path, net, tmp_path / "kc").read_text())
    assert all(v in (0, "0s") for v in proxy["conntrack"].values())
    config = realnode.write_containerd_config(tmp_path, tmp_path / "root", "localhost/p:1",
                                              tmp_path / "hosts").read_text()
    assert "restrict_oom_score_adj = true" in config
    assert f'root = "{tmp_path / "root"}"' in config
    kubelet = json.loads(realnode.write_kubelet_config(tmp_path, net, tmp_path / "pki",
                                                       tmp_path / "sock").read_text())
    assert kubelet["cgroupRoot"] == f"/{net.cgroup}" and kubelet["failCgroupV1"] is False
    assert kubelet["authentication"]["anonymous"]["enabled"] is False


def test_a_shared_disk_neither_evicts_the_nodes_pods_early_nor_fills_up_unseen(tmp_path):
    """Eviction floors are absolute (a percentage of a large shared disk tainted a CI run's node
    DiskPressure with gigabytes left); a disk short of what the node unpacks is refused before
    anything starts, with a message that says how much is needed and free."""
    import json
    import shutil

    from kubetune.devcluster import realnode

    kubelet = json.loads(realnode.write_kubelet_config(tmp_path, realnode.NodeNet(3),
                                                       tmp_path / "pki",
                                                       tmp_path / "sock").read_text())
    assert kubelet["evictionHard"]["nodefs.available"] == "1Gi"
    assert kubelet["evictionHard"]["imagefs.available"] == "1Gi"
    assert kubelet["imageGCHighThresholdPercent"] == 100
    config = realnode.write_containerd_config(tmp_path, tmp_path / "root", "localhost/p:1",
                                              tmp_path / "hosts").read_text()
    assert "discard_unpacked_layers = true" in config

    target = tmp_path / "not" / "yet" / "node"  # checked before the folder exists
    realnode.check_disk(target, need=1)
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(realnode.RealNodeError) as err:
        realnode.check_disk(target, need=free + 2**40)
    assert str(target) in str(err.value) and "GiB is free" in str(err.value)
    assert not target.exists()


def test_a_machine_that_cannot_run_the_real_node_is_told_exactly_what_is_missing(monkeypatch,
                                                                                tmp_path):
    from kubetune.devcluster import realnode
    from kubetune.devcluster.cluster import DevCluster

    monkeypatch.setattr(realnode.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("PATH", str(tmp_path))  # none of the node's commands
    monkeypatch.setattr(realnode, "CNI_BIN", tmp_path / "cni")
    monkeypatch.setattr(realnode, "REQUIREMENTS", {
        **realnode.REQUIREMENTS, "containernetworking-plugins": [str(tmp_path / "cni/bridge")]})
    missing = realnode.missing_requirements()
    assert missing[0].startswith("root:")
    assert any("Debian package containerd (containerd, ctr)" == m for m in missing), missing
    assert any("containernetworking-plugins" in m for m in missing)
    with pytest.raises(realnode.RealNodeError, match="cannot run the dev cluster's real node"):
        DevCluster(tmp_path / "c").build_images(lambda m: None)
    assert not (tmp_path / "c").exists()  # nothing started, nothing written


def test_chosen_ports_are_distinct_free_and_below_the_ephemeral_range():
    """Outbound connections take local ports from the ephemeral range: a server port chosen
    there can be gone before the server binds it."""
    import socket

    from kubetune.devcluster import procs

    floor = procs._ephemeral_floor()
    ports = procs.free_ports(50)
    assert len(set(ports)) == 50
    assert all(procs.PORT_FLOOR <= p < floor for p in ports), (floor, ports)
    for port in ports[:5]:
        with socket.socket() as sock:
            sock.bind(("0.0.0.0", port))  # free on every address


def test_wait_ready_returns_on_a_200_and_says_why_a_process_died(tmp_path):
    """How the dev cluster waits for Kueue and Flux: their /readyz answering 200, or the
    error naming the process, with its log's last lines, once it has exited."""
    import sys

    from kubetune.devcluster import procs

    class Refused(RuntimeError):
        pass

    port = procs.free_port()
    (tmp_path / "readyz").write_text("ok")
    server = procs.start("web", [sys.executable, "-m", "http.server", str(port), "--bind",
                                 "127.0.0.1", "--directory", str(tmp_path)], tmp_path / "web.log")
    try:
        procs.wait_ready(server, f"http://127.0.0.1:{port}/readyz", 30, Refused)
    finally:
        procs.stop(server)
    dying = procs.start("dying", [sys.executable, "-c", "print('no certificate'); exit(1)"],
                        tmp_path / "dying.log")
    with pytest.raises(Refused, match="dying exited(.|\n)*no certificate"):
        procs.wait_ready(dying, f"http://127.0.0.1:{procs.free_port()}/readyz", 30, Refused)
