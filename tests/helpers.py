"""Small helpers shared by tests."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(fn: Callable[[], T], timeout: float = 60, interval: float = 0.25,
             message: str = "condition") -> T:
    """Poll `fn` until it returns something truthy; fail with the last value otherwise."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except Exception as exc:  # noqa: BLE001 - keep polling through transient errors
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message}; last: {last!r}")


@dataclass
class Operator:
    proc: subprocess.Popen
    log: Path
    metrics_port: int
    health_port: int

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def start_operator(cluster, s3_server, tmp_dir: Path, namespaces: list[str] | None = None,
                   extra_env: dict | None = None) -> Operator:
    """`kubetune operator` as a subprocess against the test cluster."""
    import sys
    import time
    import urllib.request

    from kubetune.devcluster import procs

    health, metrics = procs.free_port(), procs.free_port()
    log = tmp_dir / f"operator-{health}.log"
    scope = [f"--namespace={ns}" for ns in namespaces] if namespaces else ["--all-namespaces"]
    env = {**os.environ, **cluster.env, "KUBETUNE_S3_ENDPOINT": s3_server.endpoint,
           "KUBETUNE_S3_CREDENTIALS_SECRET": "s3-creds", "KUBETUNE_RETRY_BASE_SECONDS": "1",
           "KUBETUNE_TRAINER_IMAGE": "kubetune/trainer:test", **(extra_env or {})}
    out = open(log, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "operator", *scope,
                             f"--health-port={health}", f"--metrics-port={metrics}",
                             "--bind=127.0.0.1", "--json-logs"], stdout=out,
                            stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"operator exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=1):
                return Operator(proc, log, metrics, health)
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"operator not healthy within 60s: {log.read_text()[-3000:]}")


def stop_operator(op: Operator) -> None:
    op.proc.terminate()
    try:
        op.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        op.proc.kill()
        op.proc.wait()
