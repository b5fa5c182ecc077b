"""End to end through OpenAI's fine-tuning API, with the official `openai` client, on the real
control plane, the real node and a real MLflow tracking server: upload a JSONL file to
`kubetune api`, create a job, poll its events until it succeeds (the real trainer in a pod on the
real node, logging to MLflow over the cluster network), then chat with its `fine_tuned_model`
through `kubetune serve` — the LoRAAdapter the job created, hot-swapped into the serving
Deployment. Lineage is read back from MLflow: the run the job reported pins the artifact digest
that the adapter serves, and the adapter records the run."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml
from kubernetes import client

from helpers import wait_for
from servingutil import (REAL_NODE, adapter, create_deployment, serve_deployment,
                         wait_condition, wait_ready)

from kubetune.devcluster import mlflow, procs

pytestmark = [pytest.mark.cluster, pytest.mark.trainer, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[2]
COLOURS = ["red", "green", "blue"]
CHAT = [{"messages": [{"role": "system", "content": "Answer with a colour."},
                      {"role": "user", "content": f"What colour is thing {i}?"},
                      {"role": "assistant", "content": COLOURS[i % 3]}]}
        for i in range(24)]
QUESTION = [{"role": "system", "content": "Answer with a colour."},
            {"role": "user", "content": "What colour is thing 5?"}]


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


@pytest.fixture
def tracking_url(s3_server, tmp_path):
    """A real MLflow server (the dev cluster's add-on code) on the host address the real
    node's pods reach — the one S3 listens on — never on every interface."""
    host = urllib.parse.urlsplit(s3_server.endpoint).hostname
    proc, url = mlflow.start(tmp_path / "mlflow", host=host)
    yield url
    procs.stop(proc)


def _mlflow(url: str, endpoint: str, **query) -> dict:
    full = f"{url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(full, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def api_url(cluster, s3_server, job_namespace, tracking_url, tmp_path):
    """`kubetune api` with one key for the test's namespace (watched by the operator); jobs
    land on the real node, report to MLflow, and publish their adapter to Deployment `chat`."""
    key = f"kt-{secrets.token_urlsafe(24)}"
    client.CoreV1Api(cluster.api).create_namespaced_secret(job_namespace, {
        "metadata": {"name": "api-key", "labels": {"kubetune.io/api-key": "true"}},
        "stringData": {"key": key, "namespace": job_namespace}})
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text(yaml.safe_dump({
        "baseModel": {"revision": "v1"},
        "dataset": {"maxLength": 128},
        "resources": {"gpusPerNode": 1, "nodeSelector": REAL_NODE},
        "tracking": {"mlflow": {"trackingUri": tracking_url, "experiment": "openai-api"}}}))
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig),
           "AWS_ACCESS_KEY_ID": s3_server.access_key,
           "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "operator"),
                                          os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "api.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune.cli", "api", "--host", "127.0.0.1", "--port", "0",
             "--storage", f"s3://{s3_server.bucket}/openai-e2e-{int(time.time())}",
             "--s3-endpoint", s3_server.endpoint, "--s3-region", s3_server.region,
             "--model", "tiny-llama=builtin://tiny-llama",
             "--key-namespace", job_namespace, "--spec-defaults", str(defaults),
             "--serve-deployment", "chat"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        line = wait_for(lambda: [x for x in log.read_text().splitlines() if "listening" in x],
                        timeout=60, message="kubetune api to listen")
        yield line[0].rsplit(" ", 1)[1] + "/v1", key
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_upload_train_poll_then_chat_with_the_fine_tuned_model(cluster, operator, job_namespace,
                                                               s3_server, api_url,
                                                               tracking_url):
    ns, (url, key) = job_namespace, api_url
    create_deployment(cluster, ns, serve_deployment("chat", 1, endpoint=s3_server.endpoint))
    api = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)

    uploaded = api.files.create(file=("colours.jsonl", jsonl(CHAT)), purpose="fine-tune")
    job = api.fine_tuning.jobs.create(
        model="tiny-llama", training_file=uploaded.id, suffix="colours", seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 10, "batch_size": 8, "learning_rate_multiplier": 10}}})
    assert job.status == "validating_files" and job.fine_tuned_model is None

    # Poll as a client would: the job and its events, until it has finished.
    seen: dict[str, object] = {}

    def finished():
        current = api.fine_tuning.jobs.retrieve(job.id)
        for event in api.fine_tuning.jobs.list_events(job.id, limit=100).data:
            seen[event.id] = event
        seen.setdefault("statuses", []).append(current.status)
        return current if current.status in ("succeeded", "failed", "cancelled") else None

    try:
        done = wait_for(finished, timeout=480, interval=3, message=f"job {job.id} to finish")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\noperator:\n{operator.tail()}") from None
    statuses = seen.pop("statuses")
    assert done.status == "succeeded", (done.error, [e.message for e in seen.values()])
    assert "running" in statuses, statuses  # progress was visible while it trained
    model = done.fine_tuned_model
    assert model == f"ft-tiny-llama-colours-{job.id[6:14]}"
    assert done.finished_at is not None and done.finished_at >= done.created_at
    messages = [e.message for e in seen.values()]
    assert any(m.startswith("Step ") for m in messages), messages  # training metrics
    assert f"Created fine-tuning job: {job.id}" in messages
    checkpoints = list(api.fine_tuning.jobs.checkpoints.list(job.id))
    assert checkpoints and checkpoints[0].fine_tuned_model_checkpoint == model

    # The adapter the job created is served under that name once Ready on the replica.
    ftj = client.CustomObjectsApi(cluster.api).get_namespaced_custom_object(
        "kubetune.io", "v1alpha1", ns, "finetunejobs", job.id)
    adapter_name = ftj["status"]["adapterRef"]
    ready = wait_condition(cluster, ns, adapter_name, "Ready", timeout=240, op=operator)
    assert ready["spec"]["servingName"] == model
    assert ready["status"]["replicas"] == {"desired": 1, "loaded": 1, "failed": 0}
    (pod,) = wait_ready(cluster, ns, "chat", 1)

    serve = openai.OpenAI(base_url=f"http://{pod['ip']}:8000/v1", api_key="unused",
                          max_retries=0, timeout=120)
    assert model in {m.id for m in serve.models.list().data}
    tuned = serve.chat.completions.create(model=model, messages=QUESTION, max_tokens=8,
                                          temperature=0)
    base = serve.chat.completions.create(model="base", messages=QUESTION, max_tokens=8,
                                         temperature=0)
    assert tuned.model == model and tuned.choices[0].message.role == "assistant"
    assert tuned.choices[0].message.content != base.choices[0].message.content, \
        "the fine-tuned model answers as the base model does"

    # Lineage through MLflow: run id in status, on the artifact and on the adapter.
    tracking, artifact = ftj["status"]["tracking"], ftj["status"]["artifact"]
    assert tracking["state"] == "Logged", tracking
    run_id = tracking["runId"]
    assert tracking["url"].startswith(tracking_url) and run_id in tracking["url"]
    assert artifact["trackingRunId"] == run_id
    assert adapter(cluster, ns, adapter_name)["metadata"]["annotations"][
        "kubetune.io/tracking-run-id"] == run_id
    run = _mlflow(tracking_url, "runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert tags["kubetune.artifact.manifest-sha256"] == artifact["manifestSha256"] == \
        ready["spec"]["source"]["sha256"]
    assert tags["kubetune.job-uid"] == ftj["metadata"]["uid"]
    assert params["dataset.sha256"] == artifact["datasetSha256"] == \
        ftj["spec"]["dataset"]["train"]["sha256"]
    history = _mlflow(tracking_url, "metrics/get-history", run_id=run_id,
                      metric_key="loss")["metrics"]
    assert len(history) >= 3, history  # per-step metrics, logged from the pod
