"""Experiment tracking against a real MLflow tracking server (`mlflow server`, SQLite), started
by the dev cluster's add-on code: the run is read back through MLflow's REST API. A server that
is down or never answers costs training nothing but the tracking."""

import json
import socket
import threading
import time
import urllib.parse
import urllib.request

import pytest

from trainerutil import events, summary
from kubetune import artifacts
from kubetune.devcluster import mlflow, procs
from kubetune.storage import Storage
from kubetune.trainerconfig import TrackingConfig
from kubetune_trainer import train
from kubetune_trainer.progress import Reporter
from kubetune_trainer.tracking import Tracker

pytestmark = pytest.mark.trainer
LORA = {"type": "LoRA", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory):
    proc, url = mlflow.start(tmp_path_factory.mktemp("mlflow"), host="127.0.0.1")
    yield url
    procs.stop(proc)


def _get(url: str, endpoint: str, **query) -> dict:
    full = f"{url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(full, timeout=10) as response:
        return json.loads(response.read())


def _tracked(make_config, url: str, uid: str, name: str, **tracking):
    cfg = make_config(LORA, name=name, training={"maxSteps": 20, "loggingSteps": 2},
                      data={"evalFraction": 0.2})
    cfg.evaluation.max_samples, cfg.evaluation.max_new_tokens = 8, 8
    cfg.tracking = TrackingConfig.model_validate({
        "mlflow": {"trackingUri": url, "experiment": "kubetune-tests", "runName": name,
                   "tags": {"team": "llm"}},
        "job_uid": uid, "job_name": name, "namespace": "ml", **tracking})
    return cfg


def test_a_run_is_logged_and_reads_back_through_the_rest_api(make_config, mlflow_url):
    cfg = _tracked(make_config, mlflow_url, "0f1e2d3c-aaaa-4bbb-8ccc-000000000001", "tracked")
    assert train.run(cfg) == 0, summary(cfg)
    done = summary(cfg)
    tracked = done["tracking"]
    assert tracked["state"] == "Logged", tracked
    run_id = tracked["runId"]
    assert tracked["url"] == f"{mlflow_url}/#/experiments/{tracked['experimentId']}/runs/{run_id}"

    run = _get(mlflow_url, "runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "tracked"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    final = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    manifest, digest = artifacts.verify(done["artifact"]["uri"], Storage())
    assert params["method"] == "LoRA" and params["base_model.uri"] == "builtin://tiny-llama"
    assert params["dataset.uri"] == "builtin://tiny-chat"
    assert params["dataset.sha256"] == manifest["dataset"]["sha256"]
    assert params["max_steps"] == "20" and float(params["learning_rate"]) == 0.005
    assert tags["kubetune.artifact.manifest-sha256"] == digest == \
        done["artifact"]["manifestSha256"]
    assert tags["kubetune.artifact.uri"] == done["artifact"]["uri"]
    assert tags["kubetune.job-uid"] == cfg.tracking.job_uid and tags["team"] == "llm"
    assert final["steps"] == 20 and final["trainLoss"] == pytest.approx(
        done["metrics"]["trainLoss"])
    assert final["normalizedMatch"] == pytest.approx(done["metrics"]["normalizedMatch"])
    assert "evalLoss" in final

    history = _get(mlflow_url, "metrics/get-history", run_id=run_id, metric_key="loss")["metrics"]
    steps = sorted(m["step"] for m in history)
    assert len(steps) >= 10 and steps[-1] == 20, steps  # logging step 1, then every 2
    logged = [e["loss"] for e in events(cfg) if e["event"] == "progress" and e.get("loss")
              and not e.get("final")]
    assert sorted(m["value"] for m in history) == pytest.approx(sorted(logged))
    # Lineage: the verified manifest pins the run.
    assert manifest["tracking"]["runId"] == run_id
    assert artifacts.described(manifest)["trackingRunId"] == run_id

    # The next attempt of the same job (same uid) continues this run, not a new one.
    again = Tracker(cfg.tracking, attempt=1, reporter=Reporter(cfg.logging))
    again.start({"method": "LoRA"})
    assert again.run_id == run_id and again.resumed_run
    resumed = _get(mlflow_url, "runs/get", run_id=run_id)["run"]
    assert resumed["info"]["status"] == "RUNNING"
    assert {t["key"]: t["value"] for t in resumed["data"]["tags"]}["kubetune.attempt"] == "1"
    assert again.finish("KILLED")["state"] == "Logged"
    assert _get(mlflow_url, "runs/get", run_id=run_id)["run"]["info"]["status"] == "KILLED"


class _Silent:
    """A TCP server that accepts connections and never answers (a hung tracking server)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.held: list = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self):
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.mark.parametrize("server", ["refused", "silent"])
def test_a_tracking_server_down_or_hung_costs_training_nothing(make_config, server):
    silent = _Silent() if server == "silent" else None
    url = silent.url if silent else f"http://127.0.0.1:{procs.free_port()}"
    cfg = _tracked(make_config, url, "0f1e2d3c-aaaa-4bbb-8ccc-000000000002", f"down-{server}",
                   request_timeout_seconds=1.0, start_budget_seconds=2.5)
    try:
        assert train.run(cfg) == 0, summary(cfg)
        if silent:  # the start gives up within its budget (+ one request's timeout at most)
            tracker = Tracker(cfg.tracking, attempt=0, reporter=Reporter(cfg.logging))
            started = time.monotonic()
            tracker.start({"method": "LoRA"})
            assert time.monotonic() - started < 2.5 + 1.0 + 0.5
            assert tracker.state == "Failed" and tracker.finish("FAILED")["state"] == "Failed"
    finally:
        if silent:
            silent.close()
    done = summary(cfg)
    assert done["status"] == "Succeeded" and done["artifact"]["manifestSha256"]
    assert done["tracking"]["state"] == "Failed" and "runId" not in done["tracking"]
    assert "no tracking run" in done["tracking"]["message"]
    warnings = [e for e in events(cfg) if e["event"] == "warning" and e.get("source") ==
                "tracking"]
    assert warnings and "training goes on" in warnings[0]["message"]
    manifest, _ = artifacts.verify(done["artifact"]["uri"], Storage())
    assert "tracking" not in manifest
    if silent:
        assert "timed out" in done["tracking"]["message"] or "budget" in \
            done["tracking"]["message"], done["tracking"]


def test_a_server_lost_mid_run_degrades_tracking_within_its_deadlines(make_config, tmp_path):
    proc, url = mlflow.start(tmp_path / "mlflow", host="127.0.0.1")
    cfg = _tracked(make_config, url, "0f1e2d3c-aaaa-4bbb-8ccc-000000000003", "lost",
                   finish_budget_seconds=3.0, flush_seconds=0.2)
    reporter = Reporter(cfg.logging)
    tracker = Tracker(cfg.tracking, attempt=0, reporter=reporter)
    try:
        tracker.start({"method": "LoRA"})
        assert tracker.state == "Logged" and tracker.run_id, tracker.message
        reporter.emit({"event": "progress", "step": 1, "loss": 2.0})
        deadline = time.monotonic() + 10
        while tracker._queue and time.monotonic() < deadline:  # sent by the worker thread
            time.sleep(0.1)
        history = _get(url, "metrics/get-history", run_id=tracker.run_id, metric_key="loss")
        assert [m["step"] for m in history["metrics"]] == [1]
    finally:
        procs.stop(proc)
    for step in range(2, 6):
        reporter.emit({"event": "progress", "step": step, "loss": 1.0})
    started = time.monotonic()
    report = tracker.finish("FINISHED", {"metrics": {"steps": 5, "trainLoss": 1.2}})
    assert time.monotonic() - started < 3.0 + 1.0  # the finish budget (refused at once)
    assert report["state"] == "Degraded" and report["runId"] == tracker.run_id
    assert "not sent" in report["message"] or "runs/log-batch" in report["message"]
    warnings = [e for e in events(cfg) if e["event"] == "warning"]
    assert len(warnings) == 1  # one warning, not one per failed write
