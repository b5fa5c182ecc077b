"""File names that come from outside (a manifest, an S3 listing, a request) joined to a folder
without ever leaving it.

A name is accepted only as a plain relative POSIX path: no absolute path, no empty, ``.`` or
``..`` part, no backslash or NUL, bounded lengths; and after joining, the resolved path
(symlinks followed) must still lie under the resolved folder. Anything else raises
:class:`UnsafePath` before a byte is written.
"""

from __future__ import annotations

from pathlib import Path

MAX_NAME = 1024  # bytes, the whole relative name
MAX_PART = 255  # bytes, one path component (the usual file-system limit)


class UnsafePath(ValueError):
    """A name would resolve outside its folder, or is not a plain relative name."""


def check_name(name: object) -> str:
    """`name` if it is a plain relative POSIX name; UnsafePath (naming the problem) if not."""
    if not isinstance(name, str) or not name:
        raise UnsafePath(f"file name {name!r}: must be a non-empty string")
    shown = repr(name[:200])
    if "\x00" in name or "\\" in name:
        raise UnsafePath(f"file name {shown}: NUL and backslash are not allowed")
    if len(name.encode()) > MAX_NAME:
        raise UnsafePath(f"file name {shown}: longer than {MAX_NAME} bytes")
    if name.startswith("/"):
        raise UnsafePath(f"file name {shown}: absolute paths are not allowed")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise UnsafePath(f"file name {shown}: empty, '.' and '..' parts are not allowed")
        if len(part.encode()) > MAX_PART:
            raise UnsafePath(f"file name {shown}: a part is longer than {MAX_PART} bytes")
    return name


def join(root: Path, name: str) -> Path:
    """`root / name`, refused unless it stays under `root` with symlinks resolved."""
    target = root / check_name(name)
    real_root = root.resolve()
    if not target.resolve().is_relative_to(real_root) or target.resolve() == real_root:
        raise UnsafePath(f"file name {name[:200]!r}: resolves outside {root} (a symlink?)")
    return target
