"""Exec a pod's container command inside a private mount namespace (process node agent helper).

The process node agent (a test stand-in for kubelet + a container runtime) materialises a pod's
volumes into a folder and then runs ``python -m kubetune.devcluster.podexec SPEC.json``. This
helper unshares the mount namespace, bind-mounts each volume at its ``mountPath`` so that the
program sees the same paths it would in a container (``/etc/kubetune/config.yaml``,
``/var/run/secrets/kubernetes.io/serviceaccount/token``, ``/dev/termination-log``), and execs the
command with the container's environment. The image is ignored: the command runs with this
machine's interpreters. The host is never written: a target missing on the host is made on a
private overlay (see ``privatemounts``).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

from .privatemounts import PrivateTargets, bind, enter_private_mount_namespace, under


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    if spec["mounts"]:
        enter_private_mount_namespace()
        targets = PrivateTargets(spec["scratch"])
        # Hold every source open first and mount through /proc/self/fd: a mount that covers
        # a parent folder of a later source (an emptyDir at /tmp) must not hide that source.
        held = [(os.open(m["source"], os.O_PATH), m) for m in spec["mounts"]]
        # The "image" is this machine: paths its Python needs (the venv, the source tree) that
        # a volume covers (an emptyDir at /tmp over a checkout in /tmp) are bound back on top.
        points = [m["target"].rstrip("/") or "/" for m in spec["mounts"]]
        covered = [p for p in spec.get("imagePaths", [])
                   if any(under(p, t) for t in points)]
        restore = [(os.open(p, os.O_PATH), p) for p in covered]
        for fd, mount in held:
            source = f"/proc/self/fd/{fd}"
            targets.ensure(mount["target"], is_dir=stat.S_ISDIR(os.stat(source).st_mode))
            bind(source, mount["target"], mount.get("readOnly", False))
            if not mount.get("hostPath"):
                targets.volumes.append(os.path.realpath(mount["target"]))
        for fd, path in restore:
            targets.ensure(path, is_dir=True)
            bind(f"/proc/self/fd/{fd}", path, True)
        for fd, _ in held + restore:
            os.close(fd)
    os.chdir(spec.get("workingDir") or spec["cwd"])
    command = spec["argv"]
    try:
        os.execvpe(command[0], command, spec["env"])
    except FileNotFoundError:
        print(f"podexec: executable not found: {command[0]}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv))
