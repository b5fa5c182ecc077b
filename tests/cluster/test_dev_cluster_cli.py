"""`kubetune dev-cluster up|status|env|down` as a user runs it: a second, independent cluster."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import host_state

pytestmark = pytest.mark.cluster


def _kubetune(*args, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "kubetune.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _listening_ports() -> set[int]:
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_up_status_env_down_leaves_nothing_behind(tmp_path):
    """A second dev cluster with its own real node (no project images: pause and CoreDNS),
    while the session's runs: up, status, env, down — and the host is as it was before."""
    directory = tmp_path / "dev"
    host_before = host_state()
    up = _kubetune("dev-cluster", "up", "--dir", str(directory), "--images", "none")
    assert f"export KUBECONFIG={directory / 'kubeconfig'}" in up.stdout
    assert "export AWS_ENDPOINT_URL_S3=http://10.250." in up.stdout

    state = json.loads((directory / "state.json").read_text())
    pids = [p["pid"] for p in state["procs"]]
    names = {p["name"] for p in state["procs"]}
    assert names == {"node-sandbox", "etcd", "kube-apiserver", "kube-controller-manager",
                     "kube-scheduler", "kwok", "seaweedfs", "registry",
                     "containerd", "kubelet", "kube-proxy"}
    host_ip = f"10.250.{state['node']['index']}.1"  # the node link's host side
    ports = {state["api_port"], state["etcd_port"], int(state["s3"]["endpoint"].rsplit(":", 1)[1])}
    assert ports <= _listening_ports()
    # Loopback and the node link only: no listener of ours on a public address.
    own = _owned_listeners(pids)
    assert own and all(addr.startswith("127.") or addr == host_ip for addr, _ in own), own

    status = _kubetune("dev-cluster", "status", "--dir", str(directory), "--json")
    parsed = json.loads(status.stdout)
    assert parsed["running"] is True
    assert {n["name"] for n in parsed["nodes"] if n["ready"]} >= {"kwok-gpu-0", "kwok-gpu-1",
                                                                  "kwok-cpu-0", "real-0"}
    env = _kubetune("dev-cluster", "env", "--dir", str(directory)).stdout
    assert env == up.stdout

    kube_env = {"KUBECONFIG": str(directory / "kubeconfig"),
                "PATH": f"{directory / 'bin'}:{os.environ['PATH']}"}
    nodes = subprocess.run(["kubectl", "get", "nodes", "-o", "name"], capture_output=True,
                           text=True, env={**os.environ, **kube_env}, timeout=60)
    assert "node/kwok-gpu-0" in nodes.stdout, nodes.stderr

    _kubetune("dev-cluster", "down", "--dir", str(directory))
    assert not [pid for pid in pids if _alive(pid)]
    assert not ports & _listening_ports()
    assert not _owned_listeners(pids)
    after = _kubetune("dev-cluster", "status", "--dir", str(directory), check=False)
    assert after.returncode == 1 and "not running" in after.stdout
    # Links, routes, iptables rules, mounts, cgroups, /run, /var/lib, /etc: as before `up`.
    assert host_state() == host_before


def _owned_listeners(pids: list[int]) -> list[tuple[str, int]]:
    """(address, port) of LISTEN sockets held by any process in the given process groups."""
    inodes = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            pgid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2])
            if pgid not in pids:
                continue
            for fd in (entry / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:
            hexaddr, hexport = fields[1].split(":")
            addr = ".".join(str(int(hexaddr[i:i + 2], 16)) for i in (6, 4, 2, 0))
            found.append((addr, int(hexport, 16)))
    for line in Path("/proc/net/tcp6").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:
            found.append(("v6:" + fields[1].split(":")[0], int(fields[1].split(":")[1], 16)))
    return found
