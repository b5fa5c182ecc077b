"""Mounts in a private mount namespace that never write the host.

Used by the real node's sandbox (``/var/lib/kubelet``, ``/var/lib/cni``, ``/var/log/pods`` …
bound from the dev cluster's folder) and around the image builds (buildah's fixed paths under
``/var/lib`` and ``/etc``, debootstrap's mounts). A mount target that does not exist is made inside the namespace only: the
nearest existing folder above it is covered by an overlay whose upper layer lives on a tmpfs
private to the namespace (the mounts below that folder are bound back on top), and the missing
folders or file are created in that upper layer. When the nearest existing folder is ``/``
itself, the overlay is assembled beside it and the process is chrooted into it.
"""

from __future__ import annotations

import ctypes
import os
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


def mount(source: str | None, target: str, flags: int, fstype: str | None = None,
          data: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(),
                       fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                       data.encode() if data else None), f"mount {source} -> {target}")


def enter_private_mount_namespace() -> None:
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS) (needs root)")
    mount(None, "/", MS_REC | MS_PRIVATE)


def bind(source: str, target: str, read_only: bool = False) -> None:
    mount(source, target, MS_BIND | MS_REC)
    if read_only:
        mount(None, target, MS_REMOUNT | MS_BIND | MS_RDONLY)


def _unescape(field: str) -> str:
    """A mountinfo path field: spaces, tabs, newlines and backslashes come octal-escaped."""
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as info:
        return [_unescape(line.split()[4]) for line in info]


def under(path: str, folder: str) -> bool:
    return folder == "/" or path == folder or path.startswith(folder.rstrip("/") + "/")


class PrivateTargets:
    """Makes missing mount targets exist in this mount namespace only (see the module doc).

    Call from a process that has already entered a private mount namespace."""

    def __init__(self, scratch: str):
        self.scratch = scratch  # a folder of our own; a tmpfs is mounted on it
        self.overlays: set[int] = set()  # st_dev of the overlays made so far
        self.volumes: list[str] = []  # targets bound from folders of our own: made in directly
        self.count = 0
        mount("tmpfs", scratch, 0, "tmpfs", "mode=0700")
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
        in_volume = any(under(anchor, volume) for volume in self.volumes)
        if not in_volume and os.stat(anchor).st_dev not in self.overlays:
            self._overlay(anchor)
        made = os.path.join(anchor, rest)
        if is_dir:
            os.makedirs(made, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(made), exist_ok=True)
            Path(made).touch()

    def bind(self, source: str, target: str, read_only: bool = False, own: bool = True) -> None:
        """Bind ``source`` at ``target``, making the target privately first. ``own``: the
        source is a folder of ours, so later targets below it are made in it directly."""
        self.ensure(target, is_dir=os.path.isdir(source))
        bind(source, target, read_only)
        if own:
            self.volumes.append(os.path.realpath(target))

    def _overlay(self, folder: str) -> None:
        """Cover ``folder`` with an overlay writable only here, keeping the mounts below it."""
        if any(c in folder for c in ",:"):
            raise OSError(f"cannot make a mount target under {folder!r} (',' or ':' in the path)")
        self.count += 1
        layer = f"/proc/self/fd/{self.fd}/{self.count}"
        upper, work = os.path.join(layer, "upper"), os.path.join(layer, "work")
        os.makedirs(upper)
        os.makedirs(work)
        below = sorted({m for m in mount_points() if m != folder and under(m, folder)
                        and not under(m, self.scratch)}, key=len)
        tops: list[str] = []  # the outermost ones: a recursive bind brings the rest along
        for point in below:
            if not any(under(point, top) for top in tops):
                tops.append(point)
        held = [(os.open(point, os.O_PATH), point) for point in tops]
        where = folder if folder != "/" else os.path.join(layer, "root")
        os.makedirs(where, exist_ok=True)
        mount("overlay", where, 0, "overlay", f"lowerdir={folder},upperdir={upper},workdir={work}")
        for fd, point in held:
            back = point if folder != "/" else os.path.join(where, point.lstrip("/"))
            mount(f"/proc/self/fd/{fd}", back, MS_BIND | MS_REC)
            os.close(fd)
        if folder == "/":
            os.chdir(where)
            _check(_libc.chroot(b"."), "chroot into the private overlay root")
            os.chdir("/")
        self.overlays.add(os.stat(folder).st_dev)


def main(argv: list[str] | None = None) -> int:
    """``python -m kubetune.devcluster.privatemounts --scratch DIR --bind SRC:DST ... -- CMD``:
    run CMD in a private mount namespace with folders of ours bound over fixed host paths (a
    build tool's cache under /var/lib, say), so that CMD writes nothing else on the host."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--scratch", required=True)
    parser.add_argument("--bind", action="append", default=[], metavar="SRC:DST")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    enter_private_mount_namespace()
    targets = PrivateTargets(args.scratch)
    for pair in args.bind:
        source, target = pair.split(":", 1)
        os.makedirs(source, exist_ok=True)
        targets.bind(source, target)
    try:
        os.execvp(command[0], command)
    except FileNotFoundError:
        print(f"privatemounts: executable not found: {command[0]}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    raise SystemExit(main())
