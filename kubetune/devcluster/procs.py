"""Start background processes in their own session and stop them again by PID.

A started process is remembered as (pid, start time) so that `stop` never signals a process that
merely reused the PID after ours exited."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Proc:
    name: str
    pid: int
    start_ticks: int
    log: str

    def to_dict(self) -> dict:
        return asdict(self)


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the command name in field 2 may hold spaces, so split after ')'.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])


def alive(proc: Proc) -> bool:
    ticks = _start_ticks(proc.pid)
    if ticks is None or ticks != proc.start_ticks:
        return False
    state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def start(name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                 start_new_session=True)
    ticks = _start_ticks(popen.pid)
    return Proc(name=name, pid=popen.pid, start_ticks=ticks or 0, log=str(log))


def stop(proc: Proc, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after `grace` seconds."""
    if not alive(proc):
        _reap(proc.pid)
        return
    _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(proc.pid)
        if not alive(proc) and not _group_alive(proc.pid):
            return
        time.sleep(0.1)
    _signal_group(proc.pid, signal.SIGKILL)
    for _ in range(50):
        _reap(proc.pid)
        if not alive(proc) and not _group_alive(proc.pid):
            return
        time.sleep(0.1)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


PORT_FLOOR = 10000  # ports below are left alone (well-known and registered services)


def _ephemeral_floor() -> int:
    """Where the kernel's ephemeral range starts: outbound connections take their local port
    from it, so a port chosen there can be taken before its server binds it (seen: the
    registry and SeaweedFS failed with "address already in use" on their node-link address,
    taken by a component's connection to the apiserver on that address)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on every address, below the ephemeral range (held together
    while chosen, so none is handed out twice); the kernel's choice where that range leaves
    no room below it."""
    top = _ephemeral_floor() - 1
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < count:
            sock = socket.socket()
            try:
                sock.bind(("0.0.0.0", random.randint(PORT_FLOOR, top) if top > PORT_FLOOR + 1000
                           else 0))
            except OSError:
                sock.close()
                continue
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def wait_port(port: int, proc: Proc, timeout: float, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(proc):
            raise RuntimeError(f"{proc.name} exited during start-up; last log lines:\n"
                               f"{tail(Path(proc.log))}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} did not listen on {host}:{port} within {timeout:.0f}s; "
                       f"last log lines:\n{tail(Path(proc.log))}")


def wait_ready(proc: Proc, url: str, timeout: float,
               error: type[Exception] = RuntimeError) -> None:
    """Until ``url`` (a health endpoint on loopback) answers 200; ``error`` with the log's
    last lines when the process exits first or the time is up."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(proc):
            raise error(f"{proc.name} exited; see {proc.log}:\n{tail(Path(proc.log))}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise error(f"{proc.name} not ready after {timeout:.0f}s; see {proc.log}:\n"
                f"{tail(Path(proc.log))}")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
