"""Exec a pod's container command inside a private mount namespace (process node agent helper).

The process node agent (a test stand-in for kubelet + a container runtime) materialises a pod's
volumes into a folder and then runs ``python -m kubetune.devcluster.podexec SPEC.json``. This
helper unshares the mount namespace, bind-mounts each volume at its ``mountPath`` so that the
program sees the same paths it would in a container (``/etc/kubetune/config.yaml``,
``/var/run/secrets/kubernetes.io/serviceaccount/token``, ``/dev/termination-log``), and execs the
command with the container's environment. The image is ignored: the command runs with this
machine's interpreters. A mount target that does not exist on the host is created as an empty
folder or file (the bind mount itself is private to the pod).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path

CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, flags: int) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(), None,
                       ctypes.c_ulong(flags), None), f"mount {source} -> {target}")


def enter_private_mount_namespace() -> None:
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS) (the agent must run as root)")
    _mount(None, "/", MS_REC | MS_PRIVATE)


def bind(source: str, target: str, read_only: bool, is_dir: bool) -> None:
    dst = Path(target)
    if not dst.exists():
        if is_dir:
            dst.mkdir(parents=True, exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.touch()
    _mount(source, str(dst), MS_BIND | MS_REC)
    if read_only:
        _mount(None, str(dst), MS_REMOUNT | MS_BIND | MS_RDONLY)


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    if not spec.get("workingDir"):
        os.chdir(spec["cwd"])  # before mounts: a volume at /tmp may hide the pod's folder
    if spec["mounts"]:
        enter_private_mount_namespace()
        # Hold every source open first and mount through /proc/self/fd: a mount that covers
        # a parent folder of a later source (an emptyDir at /tmp) must not hide that source.
        held = [(os.open(m["source"], os.O_PATH), m) for m in spec["mounts"]]
        # The "image" is this machine: paths its Python needs (the venv, the source tree) that
        # a volume covers (an emptyDir at /tmp over a checkout in /tmp) are bound back on top.
        targets = [m["target"].rstrip("/") or "/" for m in spec["mounts"]]
        covered = [p for p in spec.get("imagePaths", [])
                   if any(p == t or p.startswith(t.rstrip("/") + "/") for t in targets)]
        restore = [(os.open(p, os.O_PATH), p) for p in covered]
        for fd, mount in held:
            bind(f"/proc/self/fd/{fd}", mount["target"], mount.get("readOnly", False),
                 is_dir=os.path.isdir(mount["source"]))
        for fd, path in restore:
            bind(f"/proc/self/fd/{fd}", path, True, is_dir=True)
        for fd, _ in held + restore:
            os.close(fd)
    if spec.get("workingDir"):
        os.chdir(spec["workingDir"])
    command = spec["argv"]
    try:
        os.execvpe(command[0], command, spec["env"])
    except FileNotFoundError:
        print(f"podexec: executable not found: {command[0]}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv))
