"""Exec a pod's container command inside a private mount namespace (process node agent helper).

The process node agent (a test stand-in for kubelet + a container runtime) materialises a pod's
volumes into a folder and then runs ``python -m kubetune.devcluster.podexec SPEC.json``. This
helper unshares the mount namespace, bind-mounts each volume at its ``mountPath`` so that the
program sees the same paths it would in a container (``/etc/kubetune/config.yaml``,
``/var/run/secrets/kubernetes.io/serviceaccount/token``, ``/dev/termination-log``), and execs the
command with the container's environment. The image is ignored: the command runs with this
machine's interpreters.

The host is never written. A mount target that does not exist is made inside the pod's own
namespace: the nearest existing folder above it is covered by an overlay whose upper layer lives
on a tmpfs private to the pod (the mounts below that folder are bound back on top), and the
missing folders or file are created in that upper layer. When the nearest existing folder is
``/`` itself, the overlay is assembled beside it and the pod is chrooted into it.
"""

from __future__ import annotations

import ctypes
import json
import os
import stat
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


def _mount(source: str | None, target: str, flags: int, fstype: str | None = None,
           data: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(),
                       fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                       data.encode() if data else None), f"mount {source} -> {target}")


def enter_private_mount_namespace() -> None:
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS) (the agent must run as root)")
    _mount(None, "/", MS_REC | MS_PRIVATE)


def _unescape(field: str) -> str:
    """A mountinfo path field: spaces, tabs, newlines and backslashes come octal-escaped."""
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as info:
        return [_unescape(line.split()[4]) for line in info]


def _under(path: str, folder: str) -> bool:
    return folder == "/" or path == folder or path.startswith(folder.rstrip("/") + "/")


class PrivateTargets:
    """Makes missing mount targets exist in this mount namespace only (see the module doc)."""

    def __init__(self, scratch: str):
        self.scratch = scratch  # a folder of the agent's own; a tmpfs is mounted on it
        self.overlays: set[int] = set()  # st_dev of the overlays made so far
        self.volumes: list[str] = []  # targets bound from the pod's own folders (not hostPath)
        self.count = 0
        _mount("tmpfs", scratch, 0, "tmpfs", "mode=0700")
        # Reached through a held descriptor: a later mount (an emptyDir at /tmp) may hide it.
        self.fd = os.open(scratch, os.O_PATH | os.O_DIRECTORY)

    def ensure(self, target: str, is_dir: bool) -> None:
        path = os.path.abspath(target)
        if os.path.lexists(path):
            return
        anchor = os.path.dirname(path)
        while not os.path.exists(anchor):
            anchor = os.path.dirname(anchor)
        rest = os.path.relpath(path, anchor)
        anchor = os.path.realpath(anchor)
        in_volume = any(_under(anchor, volume) for volume in self.volumes)
        if not in_volume and os.stat(anchor).st_dev not in self.overlays:
            self._overlay(anchor)  # a pod's own volume takes the folder, as with a kubelet
        made = os.path.join(anchor, rest)
        if is_dir:
            os.makedirs(made, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(made), exist_ok=True)
            Path(made).touch()

    def _overlay(self, folder: str) -> None:
        """Cover ``folder`` with an overlay writable only here, keeping the mounts below it."""
        if any(c in folder for c in ",:"):
            raise OSError(f"cannot make a mount target under {folder!r} (',' or ':' in the path)")
        self.count += 1
        layer = f"/proc/self/fd/{self.fd}/{self.count}"
        upper, work = os.path.join(layer, "upper"), os.path.join(layer, "work")
        os.makedirs(upper)
        os.makedirs(work)
        below = sorted({m for m in _mount_points() if m != folder and _under(m, folder)
                        and not _under(m, self.scratch)}, key=len)
        tops: list[str] = []  # the outermost ones: a recursive bind brings the rest along
        for point in below:
            if not any(_under(point, top) for top in tops):
                tops.append(point)
        held = [(os.open(point, os.O_PATH), point) for point in tops]
        where = folder if folder != "/" else os.path.join(layer, "root")
        os.makedirs(where, exist_ok=True)
        _mount("overlay", where, 0, "overlay", f"lowerdir={folder},upperdir={upper},workdir={work}")
        for fd, point in held:
            back = point if folder != "/" else os.path.join(where, point.lstrip("/"))
            _mount(f"/proc/self/fd/{fd}", back, MS_BIND | MS_REC)
            os.close(fd)
        if folder == "/":
            os.chdir(where)
            _check(_libc.chroot(b"."), "chroot into the pod's overlay root")
            os.chdir("/")
        self.overlays.add(os.stat(folder).st_dev)


def bind(source: str, target: str, read_only: bool) -> None:
    _mount(source, target, MS_BIND | MS_REC)
    if read_only:
        _mount(None, target, MS_REMOUNT | MS_BIND | MS_RDONLY)


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
                   if any(_under(p, t) for t in points)]
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
