"""A real MLflow tracking server for the dev cluster and the tests (`dev-cluster up --with
mlflow`): `mlflow server` from PyPI with a SQLite backend and a local artifact root in the
cluster folder, bound to the address where the real node's pods reach the host (or loopback),
never to every interface.

The server lives in a virtual environment of its own, cached per machine like the Go-built
binaries: MLflow pins versions the trainer's dependencies cannot share (pyarrow < 26), and it is
a service we talk to over HTTP, never a library we import. `kubetune dev-cluster build --with
mlflow` (bootstrap.sh runs it) installs it once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from . import procs, toolchain

MLFLOW_VERSION = "3.17.2"
START_TIMEOUT = 180.0  # the first start migrates the SQLite schema (alembic), ~20 s on 2 cores
INSTALL_TIMEOUT = 1800.0


def server_venv() -> Path:
    return toolchain.cache_dir() / "mlflow" / f"venv-{MLFLOW_VERSION}"


def mlflow_binary() -> Path:
    return server_venv() / "bin" / "mlflow"


def installed() -> bool:
    return (server_venv() / ".kubetune-installed").exists() and mlflow_binary().exists()


def ensure_installed(progress=lambda msg: print(msg, file=sys.stderr, flush=True)) -> Path:
    """The `mlflow` command of the cached server environment, installed from PyPI when
    missing (minutes, once per machine)."""
    if installed():
        return mlflow_binary()
    venv = server_venv()
    progress(f"Installing the MLflow {MLFLOW_VERSION} tracking server into {venv} (first time "
             f"on this machine; cached afterwards)")
    log = venv.parent / f"install-{MLFLOW_VERSION}.log"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        for cmd in ([sys.executable, "-m", "venv", "--clear", str(venv)],
                    [str(venv / "bin" / "pip"), "install", "--progress-bar", "off",
                     f"mlflow=={MLFLOW_VERSION}"]):
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=INSTALL_TIMEOUT, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"installing MLflow failed ({' '.join(cmd[:3])}…); see "
                                   f"{log}:\n{procs.tail(log)}")
    (venv / ".kubetune-installed").touch()
    return mlflow_binary()


def start(directory: Path, host: str = "127.0.0.1",
          progress=lambda msg: print(msg, file=sys.stderr, flush=True)
          ) -> tuple[procs.Proc, str]:
    """Start `mlflow server` in `directory` on `host`; returns the process and its URL. A second
    start in the same folder (after a stop) keeps its port, runs and artifacts."""
    if host in ("0.0.0.0", "::", ""):
        raise ValueError("the MLflow server binds one address (loopback or the node link), "
                         "never every interface")
    binary = ensure_installed(progress)
    directory.mkdir(parents=True, exist_ok=True)
    artifacts = directory / "artifacts"
    artifacts.mkdir(exist_ok=True)
    saved = directory / "server.json"
    port = json.loads(saved.read_text())["port"] if saved.exists() else procs.free_port()
    saved.write_text(json.dumps({"port": port}))
    url = f"http://{host}:{port}"
    cmd = [str(binary), "server", "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
           "--artifacts-destination", str(artifacts), "--host", host, "--port", str(port),
           "--workers", "1", "--allowed-hosts", f"{host}:{port},{host},localhost:{port}"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
           "PATH": f"{binary.parent}:{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)  # the server's own environment, nothing of ours
    proc = procs.start("mlflow", cmd, directory / "mlflow.log", env=env, cwd=directory)
    try:
        procs.wait_ready(proc, f"{url}/health", timeout=START_TIMEOUT)
    except BaseException:
        procs.stop(proc)
        raise
    return proc, url
