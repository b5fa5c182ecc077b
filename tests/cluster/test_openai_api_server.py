"""`kubetune api` against the real control plane and S3, driven by the official `openai`
client: files are uploaded and converted, jobs become FineTuneJobs with the mapped spec in the
key's own namespace (and nowhere else), a wrong key gets 401, and cancel suspends the job."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import yaml
from kubernetes import client

from helpers import wait_for

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
CHAT = [{"messages": [{"role": "system", "content": "Answer with a colour."},
                      {"role": "user", "content": f"What colour is thing {i}?"},
                      {"role": "assistant", "content": ["red", "green", "blue"][i % 3]}]}
        for i in range(12)]
PREFS = [{"input": {"messages": [{"role": "user", "content": f"Colour of the sky, {i}?"}]},
          "preferred_output": [{"role": "assistant", "content": "Blue."}],
          "non_preferred_output": [{"role": "assistant", "content": "Green."}]}
         for i in range(6)]
MAX_FILE_BYTES = 16384


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _namespace(core, prefix: str) -> str:
    """Not t-*: operators of other test runs on a shared cluster watch t-* and would judge
    these jobs; here nothing reconciles them, so their status is the API's alone."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    core.create_namespace({"metadata": {"name": name}})
    return name


@pytest.fixture
def tenants(cluster, crds, namespace):
    """Two tenant namespaces, each with an API key (Secrets in `namespace`, the keys' own)."""
    core = client.CoreV1Api(cluster.api)
    names = [_namespace(core, "oai-a"), _namespace(core, "oai-b")]
    keys = []
    for index, ns in enumerate(names):
        key = f"kt-{secrets.token_urlsafe(24)}"
        core.create_namespaced_secret(namespace, {
            "metadata": {"name": f"key-{index}", "labels": {"kubetune.io/api-key": "true"}},
            "stringData": {"key": key, "namespace": ns}})
        keys.append(key)
    yield {"keys_namespace": namespace, "namespaces": names, "keys": keys}
    for ns in names:
        core.delete_namespace(ns)


@pytest.fixture
def api_url(cluster, s3_server, tenants, tmp_path):
    """`kubetune api` as a subprocess on a free port."""
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text(yaml.safe_dump({"resources": {"gpusPerNode": 0},
                                        "baseModel": {"revision": "v1"}}))
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig),
           "AWS_ACCESS_KEY_ID": s3_server.access_key,
           "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "operator"),
                                          os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "api.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune.cli", "api", "--host", "127.0.0.1", "--port", "0",
             "--storage", f"s3://{s3_server.bucket}/openai-api-tests",
             "--s3-endpoint", s3_server.endpoint, "--s3-region", s3_server.region,
             "--model", "tiny-llama=builtin://tiny-llama",
             "--key-namespace", tenants["keys_namespace"], "--spec-defaults", str(defaults),
             "--serve-deployment", "chat", "--max-file-bytes", str(MAX_FILE_BYTES)],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        line = wait_for(lambda: [x for x in log.read_text().splitlines() if "listening" in x],
                        timeout=60, message="kubetune api to listen")
        yield line[0].rsplit(" ", 1)[1] + "/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def _ftj(cluster, ns: str, name: str) -> dict | None:
    try:
        return client.CustomObjectsApi(cluster.api).get_namespaced_custom_object(
            "kubetune.io", "v1alpha1", ns, "finetunejobs", name)
    except client.exceptions.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def test_supervised_job_lands_in_the_keys_namespace_only(cluster, s3_client, s3_server,
                                                         tenants, api_url):
    ns_a, ns_b = tenants["namespaces"]
    a, b = (_client(api_url, k) for k in tenants["keys"])
    uploaded = a.files.create(file=("colours.jsonl", jsonl(CHAT)), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(jsonl(CHAT))
    assert a.files.retrieve(uploaded.id).filename == "colours.jsonl"
    with pytest.raises(openai.NotFoundError):
        b.files.retrieve(uploaded.id)  # files are per key too

    job = a.fine_tuning.jobs.create(
        model="tiny-llama", training_file=uploaded.id, suffix="colours", seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 2, "batch_size": 16, "learning_rate_multiplier": 2}}})
    assert job.id.startswith("ftjob-") and job.status == "validating_files"
    assert job.fine_tuned_model is None and job.training_file == uploaded.id
    ftj = _ftj(cluster, ns_a, job.id)
    assert ftj is not None and _ftj(cluster, ns_b, job.id) is None
    spec = ftj["spec"]
    assert spec["objective"] == "sft" and spec["dataset"]["format"] == "messages"
    assert spec["training"] == {"epochs": 2, "perDeviceBatchSize": 8,
                                "gradientAccumulationSteps": 2, "learningRate": 1e-3, "seed": 7}
    assert spec["baseModel"] == {"uri": "builtin://tiny-llama", "revision": "v1"}
    assert spec["resources"] == {"gpusPerNode": 0}  # from --spec-defaults
    adapter = spec["output"]["createAdapter"]
    assert adapter["servingName"] == f"ft-tiny-llama-colours-{job.id[6:14]}"
    assert adapter["target"] == {"deployment": "chat"}
    # the training data is the converted file, pinned by its digest
    train = spec["dataset"]["train"]
    key = train["uri"].split("/", 3)[3]
    stored = s3_client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
    assert json.loads(stored.splitlines()[0]) == CHAT[0]
    assert train["sha256"] == hashlib.sha256(stored).hexdigest()

    assert [j.id for j in a.fine_tuning.jobs.list()] == [job.id]
    assert list(b.fine_tuning.jobs.list()) == []
    with pytest.raises(openai.NotFoundError):
        b.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.AuthenticationError):
        _client(api_url, "kt-wrong-key-0123456789").fine_tuning.jobs.list()

    events = a.fine_tuning.jobs.list_events(job.id)
    assert any(e.message == f"Created fine-tuning job: {job.id}" for e in events.data)
    assert list(a.fine_tuning.jobs.checkpoints.list(job.id)) == []

    cancelled = a.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert _ftj(cluster, ns_a, job.id)["spec"]["scheduling"]["suspend"] is True
    with pytest.raises(openai.BadRequestError):
        a.fine_tuning.jobs.cancel(job.id)  # already cancelled
    assert a.fine_tuning.jobs.retrieve(job.id).status == "cancelled"


def test_dpo_job_and_refusals(cluster, tenants, api_url):
    ns_a = tenants["namespaces"][0]
    a = _client(api_url, tenants["keys"][0])
    prefs = a.files.create(file=("prefs.jsonl", jsonl(PREFS)), purpose="fine-tune")
    job = a.fine_tuning.jobs.create(model="tiny-llama", training_file=prefs.id, method={
        "type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 1}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.25
    spec = _ftj(cluster, ns_a, job.id)["spec"]
    assert spec["objective"] == "dpo" and spec["dpo"] == {"beta": 0.25}
    assert spec["dataset"]["format"] == "preference"

    with pytest.raises(openai.BadRequestError, match="needs chat records"):
        a.fine_tuning.jobs.create(model="tiny-llama", training_file=prefs.id)
    with pytest.raises(openai.BadRequestError, match="not available"):
        a.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=prefs.id)
    with pytest.raises(openai.BadRequestError, match="invalid job id"):
        a.fine_tuning.jobs.retrieve("ftjob-../../secrets")
    with pytest.raises(openai.BadRequestError, match="line 2: not JSON"):
        a.files.create(file=("bad.jsonl", jsonl(CHAT[:1]) + b"{oops\n"), purpose="fine-tune")
    with pytest.raises(openai.APIStatusError) as too_big:
        a.files.create(file=("big.jsonl", b" " * (MAX_FILE_BYTES * 5)), purpose="fine-tune")
    assert too_big.value.status_code == 413
    assert too_big.value.body["type"] == "invalid_request_error"
