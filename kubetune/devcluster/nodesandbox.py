"""PID 1 of the real node's sandbox: its own PID, mount and network namespaces.

The real node (kubelet, containerd, kube-proxy and every container they start) lives in the
namespaces this process creates with ``unshare``, as a kind node lives in its container:

* network: the pod bridge, the pods' network namespaces, every iptables rule of kubelet,
  kube-proxy and the CNI plugins, and sysctls such as ``net.ipv4.ip_forward`` exist only there;
  one veth pair joins it to the host (the host side holds the address the cluster serves on);
* mounts: ``/run`` is a private tmpfs (containerd's sockets, runc's state, ``/run/netns``) and
  the node's own folders (``/var/lib/kubelet``, ``/var/lib/cni``, ``/var/log/pods``,
  ``/var/log/containers``) are bound from the dev cluster's folder on private overlays
  (``privatemounts``): nothing is created under the host's ``/var`` or ``/run``;
* PIDs: when this process ends, the kernel ends every process of the node with it.

Four kernel settings that kubelet insists on changing (``vm.overcommit_memory``,
``vm.panic_on_oom``, ``kernel.panic``, ``kernel.panic_on_oops``) are global, not per namespace:
inside the sandbox they read as kubelet wants them (files bound over ``/proc/sys``), so the
host's values are never touched.

Run as ``unshare --pid --fork --mount --net --propagation private --mount-proc python -m
kubetune.devcluster.nodesandbox --dir DIR``; it writes ``DIR/ready`` once the mounts are in place
and then only reaps orphans until it is told to stop.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from .privatemounts import PrivateTargets, bind, mount

# What kubelet's container manager sets at start (pkg/kubelet/cm, setupKernelTunables).
KUBELET_SYSCTLS = {"vm/overcommit_memory": "1", "vm/panic_on_oom": "0", "kernel/panic": "10",
                   "kernel/panic_on_oops": "1", "kernel/keys/root_maxkeys": "1000000",
                   "kernel/keys/root_maxbytes": "25000000"}

# Paths the node's programs use that are fixed in their code: bound from the cluster's folder.
NODE_FOLDERS = {"/var/lib/kubelet": "kubelet", "/var/lib/cni": "cni/lib",
                "/var/log/pods": "logs/pods", "/var/log/containers": "logs/containers"}


def setup_mounts(directory: Path) -> None:
    mount("tmpfs", "/run", 0, "tmpfs", "mode=0755")
    scratch = directory / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    targets = PrivateTargets(str(scratch))
    for target, folder in NODE_FOLDERS.items():
        source = directory / folder
        source.mkdir(parents=True, exist_ok=True)
        targets.bind(str(source), target)
    values = directory / "sysctl"
    values.mkdir(exist_ok=True)
    for key, value in KUBELET_SYSCTLS.items():
        path = Path("/proc/sys") / key
        if path.read_text().strip() != value:
            fake = values / key.replace("/", ".")
            fake.write_text(value + "\n")
            bind(str(fake), str(path), read_only=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="the node's folder")
    args = parser.parse_args(argv)
    if os.getpid() != 1:
        print("nodesandbox: must run as PID 1 of a new PID namespace (see the module doc)",
              file=sys.stderr)
        return 2
    setup_mounts(args.dir)

    def on_term(signum, frame):  # noqa: ARG001
        sys.exit(0)  # the kernel then ends every process of the node

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    (args.dir / "ready").write_text("ready\n")
    while True:
        try:
            os.waitpid(-1, 0)  # orphans of the node (containerd's shims re-parent here)
        except ChildProcessError:
            signal.pause()


if __name__ == "__main__":
    sys.exit(main())
