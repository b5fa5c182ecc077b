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
           "KUBETUNE_TRAINER_IMAGE": cluster.env["KUBETUNE_TRAINER_IMAGE"],
           # the refusing "S3" one test points a job at, allowed by policy like any endpoint
           # an admin lists
           "KUBETUNE_ALLOWED_S3_ENDPOINTS": '["http://127.0.0.1:9"]', **(extra_env or {})}
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


class PodLogs:
    """The log of an operator running as a pod (read through the kubelet, `kubectl logs`),
    with the `tail()` that failure messages use."""

    def __init__(self, cluster, namespace: str, selector: str):
        self.cluster, self.namespace, self.selector = cluster, namespace, selector

    def pod(self):
        from kubernetes import client

        pods = client.CoreV1Api(self.cluster.api).list_namespaced_pod(
            self.namespace, label_selector=self.selector).items
        assert len(pods) == 1, [p.metadata.name for p in pods]
        return pods[0]

    def tail(self, lines: int = 60) -> str:
        out = self.cluster.kubectl("logs", "-n", self.namespace, "-l", self.selector,
                                   f"--tail={lines}", check=False)
        return out.stdout + out.stderr


def host_state() -> dict:
    """What a dev cluster must leave as it found it on this machine: network links, routes,
    iptables rules, mounts, top-level cgroups, and the folders the node's programs would
    write by default."""
    def run(*cmd: str) -> str:
        return subprocess.run(cmd, capture_output=True, text=True).stdout

    def listing(folder: str) -> list[str]:
        try:
            return sorted(os.listdir(folder))
        except FileNotFoundError:
            return []

    mounts = sorted(line.split()[4] for line in Path("/proc/self/mountinfo").read_text()
                    .splitlines())
    cgroups = {str(h): listing(str(h)) for h in Path("/sys/fs/cgroup").iterdir() if h.is_dir()}
    return {"links": sorted(line.split(":")[1].split("@")[0].strip()
                            for line in run("ip", "-o", "link").splitlines()),
            "routes": sorted(run("ip", "route").splitlines()),
            "iptables": {table: run("iptables", "-t", table, "-S").splitlines()
                         for table in ("filter", "nat", "mangle", "raw")},
            "mounts": mounts, "cgroups": cgroups,
            **{folder: listing(folder) for folder in ("/run", "/var/lib", "/var/log", "/etc",
                                                       "/opt", "/var/run/netns")},
            "sysctl": {k: Path(f"/proc/sys/{k}").read_text() for k in (
                "vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops",
                "net/ipv4/ip_forward")}}


def request_json(url: str, body: dict | None = None, timeout: float = 120,
                 key: str | None = None) -> tuple[int, object]:
    """(status, parsed JSON or text) of a GET (no body) or POST; `key` is sent as a bearer
    token. HTTP errors are answers, not exceptions."""
    import json
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status = resp.read().decode(), resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read().decode(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def start_serve(folder: Path, *args: str, env: dict | None = None) -> tuple[str, subprocess.Popen]:
    """`kubetune serve --host 127.0.0.1 --port <free> --cache-dir <folder>/cache ARGS` as a
    process, once /health answers: (base URL, process). Its log is `folder/serve.log`."""
    import sys
    import urllib.request

    from kubetune.devcluster import procs

    port = procs.free_port()
    log = folder / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "serve", *args,
                             "--host", "127.0.0.1", f"--port={port}",
                             f"--cache-dir={folder / 'cache'}"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return url, proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"kubetune serve not healthy within 120 s:\n{log.read_text()[-3000:]}")
