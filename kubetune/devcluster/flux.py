"""Flux in the dev cluster: the real source-controller and kustomize-controller (built from
their Go modules), their CRDs, and a Git server on this machine that they read over HTTP.

Both controllers run as processes beside the control plane with the cluster's admin identity
(no impersonation: `--default-service-account` unset), watching every namespace, without
leader election or an events receiver. source-controller keeps artifacts under the cluster
folder and serves them on loopback, where kustomize-controller fetches them. The Git server
(`gitserver.py`) serves the bare repositories under `<cluster dir>/git` at
`http://127.0.0.1:<port>/<name>.git`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from . import procs, toolchain

NAMESPACE = "flux-system"
CONTROLLERS = ("source-controller", "kustomize-controller")


class FluxError(RuntimeError):
    """Flux did not start; the message says why and where the log is."""


def controller_args(name: str, health: int, metrics: int, storage: int | None = None,
                    storage_dir: Path | None = None) -> list[str]:
    args = [f"--health-addr=127.0.0.1:{health}", f"--metrics-addr=127.0.0.1:{metrics}",
            "--watch-all-namespaces=true", "--events-addr=", "--log-encoding=console"]
    if name == "source-controller":
        args += [f"--storage-path={storage_dir}", f"--storage-addr=127.0.0.1:{storage}",
                 f"--storage-adv-addr=127.0.0.1:{storage}"]
    else:
        args += ["--no-remote-bases=true"]
    return args


class Flux:
    def __init__(self, directory: Path, kubeconfig: Path, kubectl: Path):
        self.dir = directory
        self.kubeconfig = kubeconfig
        self.kubectl = kubectl

    @property
    def git_root(self) -> Path:
        return self.dir / "git"

    def _kubectl(self, *args: str, input: str | None = None) -> str:
        done = subprocess.run([str(self.kubectl), f"--kubeconfig={self.kubeconfig}", *args],
                              input=input, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise FluxError(f"kubectl {' '.join(args[:2])}: {done.stderr.strip()[-2000:]}")
        return done.stdout

    def start(self, logs: Path, progress, track, timeout: float = 120) -> int:
        """Start the Git server and both controllers (each passed to `track` once started);
        returns the Git server's port."""
        t0 = time.monotonic()
        for name in CONTROLLERS:
            self._kubectl("apply", "--server-side", "--force-conflicts", "-f",
                          str(toolchain.tool(name).path.parent / "manifests" / "crds"))
        for name in CONTROLLERS:
            self._kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f",
                          str(toolchain.tool(name).path.parent / "manifests" / "crds"))
        self._kubectl("apply", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}))
        self.git_root.mkdir(parents=True, exist_ok=True)
        git_port = procs.free_port()
        git = track(procs.start("git-http", [sys.executable, "-m", "kubetune.devcluster.gitserver",
                                             str(self.git_root), str(git_port)],
                                logs / "git-http.log"))
        procs.wait_port(git_port, git, timeout=30)
        storage_dir = self.dir / "flux" / "storage"
        storage_dir.mkdir(parents=True, exist_ok=True)
        env = {"KUBECONFIG": str(self.kubeconfig), "PATH": "/usr/bin:/bin",
               "HOME": str(self.dir / "flux")}
        for name in CONTROLLERS:
            health, metrics, storage = procs.free_ports(3)
            proc = track(procs.start(name, [
                str(toolchain.binary(name)),
                *controller_args(name, health, metrics, storage, storage_dir)],
                logs / f"{name}.log", env=env))
            procs.wait_ready(proc, f"http://127.0.0.1:{health}/readyz", timeout, FluxError)
        progress(f"Started Flux (source-controller {toolchain.FLUX_SOURCE_VERSION}, "
                 f"kustomize-controller {toolchain.FLUX_KUSTOMIZE_VERSION}) and a Git server "
                 f"on http://127.0.0.1:{git_port} in {time.monotonic() - t0:.1f}s")
        return git_port

    def create_repository(self, name: str) -> Path:
        """A bare repository `<name>.git` (branch main) served by the Git server."""
        path = self.git_root / f"{name}.git"
        if not path.exists():
            subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(path)], check=True)
        return path
