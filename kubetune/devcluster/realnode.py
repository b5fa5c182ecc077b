"""The real node: kubelet + containerd + runc + kube-proxy running pods from real images.

Everything of the node lives in a sandbox of its own namespaces (``nodesandbox``): the pod
bridge, the pods' network namespaces, every iptables rule and mount. The host keeps only:

* one veth pair ``kubetune-<N>`` (host side ``10.250.<N>.1/30``, the node ``10.250.<N>.2``),
  on which the control plane and S3 listen so that pods reach them, and a route to the node's
  pod range ``10.246.<N>.0/24`` through it; both vanish with the sandbox;
* one cgroup folder ``kubetune-<N>`` in each cgroup hierarchy (kubelet's ``cgroupRoot``),
  removed by ``stop``;
* the node's files, in the dev cluster's folder.

Pods reach only addresses on this machine: the node's network namespace has no default route,
the pods' routes cover the pod range, the Service range and the host address only, and the host
does not forward (``net.ipv4.ip_forward`` stays as it is).

The GPUs of the node are a STAND-IN: ``nvidia.com/gpu`` is advertised as an extended resource
(8 per node, labelled ``kubetune.io/gpu-stand-in=true``) so that GPU requests schedule here;
the containers run on the CPU.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import procs

NODE_NAME = "real-0"
SERVICE_CIDR = "10.96.0.0/16"
DNS_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
GPU_STAND_IN = {"nvidia.com/gpu": "8"}
NODE_LABELS = {"kubetune.io/pool": "gpu", "nvidia.com/gpu.present": "true",
               "kubetune.io/real-node": "true", "kubetune.io/gpu-stand-in": "true"}
GPU_TAINT = "nvidia.com/gpu=present:NoSchedule"
CGROUP_ROOT = Path("/sys/fs/cgroup")
CNI_BIN = Path("/usr/lib/cni")

# Debian packages and the commands/files they bring.
REQUIREMENTS = {
    "containerd": ["containerd", "ctr"], "runc": ["runc"],
    "containernetworking-plugins": [str(CNI_BIN / p) for p in ("bridge", "host-local",
                                                                "loopback")],
    "iptables": ["iptables"], "conntrack": ["conntrack"], "iproute2": ["ip"],
    "util-linux": ["unshare", "nsenter"],
    "buildah": ["buildah"], "debootstrap": ["debootstrap"], "gcc": ["gcc"],
}


class RealNodeError(RuntimeError):
    """This machine cannot run the real node; the message says exactly what is missing."""


@dataclass
class NodeNet:
    """Addresses of one real node (``index`` keeps two dev clusters on one machine apart)."""
    index: int

    @property
    def link(self) -> str:
        return f"kubetune-{self.index}"

    @property
    def host_ip(self) -> str:
        return f"10.250.{self.index}.1"

    @property
    def node_ip(self) -> str:
        return f"10.250.{self.index}.2"

    @property
    def link_cidr(self) -> str:
        return f"10.250.{self.index}.0/30"

    @property
    def pod_cidr(self) -> str:
        return f"10.246.{self.index}.0/24"

    @property
    def pod_gateway(self) -> str:
        return f"10.246.{self.index}.1"

    @property
    def cgroup(self) -> str:
        return f"kubetune-{self.index}"


def missing_requirements() -> list[str]:
    """What this machine lacks to run the real node, one line each (empty when it can)."""
    out = []
    if os.geteuid() != 0:
        out.append("root: the real node (kubelet, containerd, network namespaces) runs as root")
    for package, needs in REQUIREMENTS.items():
        absent = [n for n in needs if not (Path(n).exists() if n.startswith("/")
                                           else shutil.which(n))]
        if absent:
            out.append(f"Debian package {package} ({', '.join(absent)})")
    if "overlay" not in Path("/proc/filesystems").read_text():
        out.append("the overlay filesystem (containerd's snapshotter)")
    for controller in ("cpu", "cpuacct", "cpuset", "memory", "pids"):
        if not _hierarchy(controller):
            out.append(f"a mounted cgroup hierarchy with the {controller} controller")
    return out


# What the node's containerd holds once the project's images are pulled and unpacked (about 6
# GiB, the trainer's Python stack most of it), with room for a layer's download beside its
# unpacked copy, the training runs' scratch and the eviction floor.
NODE_DISK_BYTES = 10 * 2**30


def check_disk(directory: Path, need: int = NODE_DISK_BYTES) -> None:
    """Refuse to start a node that would fill the disk: a node short of space is tainted
    DiskPressure and every pod then waits, with nothing in a test's output saying why."""
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise RealNodeError(
            f"the real node needs {need / 2**30:.0f} GiB free where its images are unpacked "
            f"({directory}), and {free / 2**30:.1f} GiB is free: free disk space (a dev "
            "cluster left by a killed run is stopped with `kubetune dev-cluster down "
            "--dir DIR`, which removes its unpacked images)")


def install_requirements(progress) -> None:
    """Install the Debian packages the real node needs (as root, with apt-get)."""
    packages = [p for p, needs in REQUIREMENTS.items()
                if any(not (Path(n).exists() if n.startswith("/") else shutil.which(n))
                       for n in needs)]
    if not packages:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RealNodeError("the real node needs these Debian packages: " + " ".join(packages)
                            + " (install them as root: apt-get install " + " ".join(packages)
                            + ")")
    progress(f"Installing Debian packages for the real node: {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RealNodeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}"
                                f"{proc.stderr[-2000:]}")


def _hierarchy(controller: str) -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        fstype, options = fields[sep + 1], fields[sep + 3].split(",")
        if fstype == "cgroup" and controller in options:
            return Path(fields[4])
    return None


def cgroup_hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy (v1 controllers, named ones and the v2 one)."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        if fields[sep + 1] in ("cgroup", "cgroup2"):
            out.append(Path(fields[4]))
    return out


def choose_net() -> NodeNet:
    """A node index whose addresses and pod range no interface or route of this machine uses."""
    used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout + \
        subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for _ in range(200):
        net = NodeNet(random.randint(1, 254))
        if (f"10.250.{net.index}." not in used and f"10.246.{net.index}." not in used
                and f" {net.link}@" not in links and f" {net.link}:" not in links):
            return net
    raise RealNodeError("found no free 10.250.N.0/30 + 10.246.N.0/24 for the node")


def _run(cmd: list[str], what: str, **kwargs) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise RealNodeError(f"{what} failed ({' '.join(cmd)}): {proc.stderr.strip()[-1500:]}")
    return proc.stdout


def sandbox_init_pid(sandbox: procs.Proc) -> int:
    """The host PID of the sandbox's PID 1 (the child of ``unshare --fork``)."""
    children = Path(f"/proc/{sandbox.pid}/task/{sandbox.pid}/children").read_text().split()
    if not children:
        raise RealNodeError(f"the node sandbox has no init process:\n"
                            f"{procs.tail(Path(sandbox.log))}")
    return int(children[0])


def start_sandbox(directory: Path, net: NodeNet, logs: Path) -> procs.Proc:
    """The node's namespaces, its veth pair and its cgroups (before the control plane, whose
    address is the veth's host side)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ready").unlink(missing_ok=True)
    proc = procs.start("node-sandbox", [
        "unshare", "--pid", "--fork", "--mount", "--net", "--propagation", "private",
        "--mount-proc", sys.executable, "-m", "kubetune.devcluster.nodesandbox",
        f"--dir={directory}"], logs / "node-sandbox.log")
    deadline = time.monotonic() + 30
    while not (directory / "ready").exists():
        if not procs.alive(proc) or time.monotonic() > deadline:
            raise RealNodeError(f"the node sandbox did not start:\n{procs.tail(Path(proc.log))}")
        time.sleep(0.05)
    pid = sandbox_init_pid(proc)
    inside = ["nsenter", f"--target={pid}", "--net", "--"]
    _run(["ip", "link", "add", net.link, "type", "veth", "peer", "name", "eth0", "netns",
          str(pid)], "creating the node's veth pair")
    _run(["ip", "addr", "add", f"{net.host_ip}/30", "dev", net.link], "addressing the veth")
    _run(["ip", "link", "set", net.link, "up"], "raising the veth")
    for cmd in (["ip", "link", "set", "lo", "up"],
                ["ip", "addr", "add", f"{net.node_ip}/30", "dev", "eth0"],
                ["ip", "link", "set", "eth0", "up"],
                ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]):
        _run(inside + cmd, "configuring the node's network")
    _run(["ip", "route", "add", net.pod_cidr, "via", net.node_ip, "dev", net.link],
         "routing the pod range to the node")
    make_cgroups(net.cgroup)
    return proc


def make_cgroups(name: str) -> None:
    """kubelet's cgroupRoot in every hierarchy (cpuset needs its cpus and mems filled in)."""
    for hierarchy in cgroup_hierarchies():
        path = hierarchy / name
        path.mkdir(exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):
            if (path / knob).exists() and not (path / knob).read_text().strip():
                (path / knob).write_text((hierarchy / knob).read_text())


def remove_cgroups(name: str, timeout: float = 20) -> list[str]:
    """Remove kubelet's cgroup folders, deepest first; returns what could not be removed."""
    deadline = time.monotonic() + timeout
    left: list[str] = []
    while True:
        left = []
        for hierarchy in cgroup_hierarchies():
            root = hierarchy / name
            if not root.exists():
                continue
            for folder in sorted((p for p in root.rglob("*") if p.is_dir()),
                                 key=lambda p: len(p.parts), reverse=True) + [root]:
                try:
                    folder.rmdir()
                except OSError:
                    left.append(str(folder))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def remove_link(net: NodeNet) -> None:
    """The veth goes with the node's network namespace; remove it if something kept it."""
    links = subprocess.run(["ip", "-o", "link", "show", net.link], capture_output=True,
                           text=True)
    if links.returncode == 0 and links.stdout.strip():
        subprocess.run(["ip", "link", "del", net.link], capture_output=True)


def write_containerd_config(directory: Path, root: Path, pause_image: str,
                            registry_hosts: Path) -> Path:
    cni = directory / "cni"
    (cni / "net.d").mkdir(parents=True, exist_ok=True)
    config = directory / "containerd" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    sock = socket_path(directory)
    config.write_text(f'''version = 2
root = "{root}"
state = "{directory / 'containerd' / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{directory / 'containerd' / 'opt'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_image}"
  # This machine withholds CAP_SYS_RESOURCE: lowering oom_score_adj would fail in runc.
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    # Compressed layers are dropped once unpacked: the registry keeps them (gigabytes saved).
    discard_unpacked_layers = true
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{shutil.which('runc') or 'runc'}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{cni / 'net.d'}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{registry_hosts}"
''')
    return config


def socket_path(directory: Path) -> Path:
    return directory / "containerd" / "containerd.sock"


def write_cni_config(directory: Path, net: NodeNet) -> None:
    """A bridge with no masquerade and no default route: pods reach the pod range, Services
    and the host's cluster address, nothing else."""
    (directory / "cni" / "net.d" / "10-kubetune.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "kubetune", "plugins": [{
            "type": "bridge", "bridge": "kt0", "isGateway": True, "ipMasq": False,
            "hairpinMode": True,
            "ipam": {"type": "host-local",
                     "ranges": [[{"subnet": net.pod_cidr, "gateway": net.pod_gateway}]],
                     "routes": [{"dst": SERVICE_CIDR}, {"dst": net.link_cidr}]}}]},
        indent=2))


def write_kubelet_config(directory: Path, net: NodeNet, pki_dir: Path, sock: Path) -> Path:
    resolv = directory / "resolv.conf"
    resolv.write_text("")  # no host resolvers or search paths leak into pods
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "address": net.node_ip, "readOnlyPort": 0, "healthzBindAddress": "127.0.0.1",
        "tlsCertFile": str(pki_dir / "kubelet.crt"),
        "tlsPrivateKeyFile": str(pki_dir / "kubelet.key"),
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                           "x509": {"clientCAFile": str(pki_dir / "ca.crt")}},
        "authorization": {"mode": "AlwaysAllow"},  # only holders of our CA's certs get here
        "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{net.cgroup}",
        "failCgroupV1": False,  # this machine has v1 controllers (hybrid cgroups)
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{sock}",
        "volumePluginDir": str(directory / "volume-plugins"),
        "resolvConf": str(resolv), "clusterDNS": [DNS_IP], "clusterDomain": CLUSTER_DOMAIN,
        "serializeImagePulls": False, "registerNode": True,
        # A busy developer machine must not evict pods: only a nearly full disk or memory.
        # Absolute sizes, not percentages: the node shares a disk whose reported size can be
        # far more than what it may fill (a CI run here was tainted DiskPressure at "2%" with
        # 5 GB left, and every test that needed the node failed for it).
        "evictionHard": {"memory.available": "200Mi", "nodefs.available": "1Gi",
                         "imagefs.available": "1Gi", "nodefs.inodesFree": "1%"},
        # No image garbage collection: the node's images are the project's own, wiped with
        # the node at `down`; collecting them mid-run only forces gigabytes to be pulled again.
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "nodeStatusUpdateFrequency": "4s", "nodeStatusReportFrequency": "20s",
        "shutdownGracePeriod": "0s",
    }
    path = directory / "kubelet-config.yaml"
    path.write_text(json.dumps(config, indent=2))
    return path


def write_kube_proxy_config(directory: Path, net: NodeNet, kubeconfig: Path) -> Path:
    config = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)}, "mode": "iptables",
        "clusterCIDR": net.pod_cidr, "hostnameOverride": NODE_NAME,
        "bindAddress": net.node_ip, "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # Conntrack limits are global, not per namespace: leave the host's alone.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                      "tcpCloseWaitTimeout": "0s", "udpTimeout": "0s",
                      "udpStreamTimeout": "0s"},
    }
    path = directory / "kube-proxy-config.yaml"
    path.write_text(json.dumps(config, indent=2))
    return path


def node_command(init_pid: int, cmd: list[str]) -> list[str]:
    """``cmd`` run inside the node's namespaces."""
    return ["nsenter", f"--target={init_pid}", "--mount", "--net", "--pid", "--", *cmd]


def wait_socket(path: Path, proc: procs.Proc, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not procs.alive(proc) or time.monotonic() > deadline:
            raise RealNodeError(f"{proc.name} did not open {path}:\n{procs.tail(Path(proc.log))}")
        time.sleep(0.1)


def ctr(sock: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["ctr", f"--address={sock}", "--namespace=k8s.io", *args],
                          capture_output=True, text=True, **kwargs)
