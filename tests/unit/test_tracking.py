"""Experiment tracking, pure parts: the API block, the trainer config, the pod's env, the
operator's policy, status.tracking from a summary, lineage from a manifest, and the trainer's
REST client against a real local HTTP server (redirects, oversize and error answers)."""

import http.server
import json
import threading
from pathlib import Path

import pytest
import yaml

from kubetune import artifacts
from kubetune.api.validation import SpecError, parse
from kubetune.contract import TerminationSummary
from kubetune.trainerconfig import TrainerConfig, from_finetunejob
from kubetune_operator import policy
from kubetune_operator.reconcile import finetunejob as rec
from kubetune_operator.reconcile import tracking
from kubetune_operator.resources import finetunejob as res
from kubetune_operator.settings import OperatorSettings
from kubetune_trainer import tracking as client

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
NOW = rec.datetime(2026, 11, 28, 12, 0, 0, tzinfo=rec.timezone.utc)
RUN = "a" * 32
URL = f"http://mlflow.mlops.svc:5000/#/experiments/3/runs/{RUN}"


def _body(**mlflow) -> dict:
    obj = yaml.safe_load((ROOT / "examples/finetunejob-mlflow.yaml").read_text())
    obj["metadata"].update(namespace="ml", uid="0f1e2d3c-aaaa-4bbb-8ccc-000000000001",
                           generation=1)
    obj["spec"]["tracking"]["mlflow"].update(mlflow)
    return obj


# ---- API -------------------------------------------------------------------------------------
def test_the_example_parses_and_renders_into_the_trainer_config():
    job = parse(_body())
    m = job.spec.tracking.mlflow
    assert m.experiment == "reviews-sentiment" and m.credentials_secret.name == \
        "mlflow-credentials"
    cfg = from_finetunejob(job, namespace="ml")
    assert cfg.tracking.job_uid == "0f1e2d3c-aaaa-4bbb-8ccc-000000000001"
    assert cfg.tracking.job_name == "tracked-lora" and cfg.tracking.namespace == "ml"
    again = TrainerConfig.model_validate(yaml.safe_load(cfg.dump()))
    assert again.tracking == cfg.tracking
    assert yaml.safe_load(cfg.dump())["tracking"]["mlflow"]["trackingUri"] == \
        "http://mlflow.mlops.svc:5000"
    plain = yaml.safe_load((ROOT / "examples/finetunejob-lora.yaml").read_text())
    assert from_finetunejob(parse(plain)).tracking is None


@pytest.mark.parametrize("change, field", [
    ({"trackingUri": "ftp://mlflow:5000"}, "spec.tracking.mlflow.trackingUri"),
    ({"trackingUri": "http://user:pw@mlflow:5000"}, "spec.tracking.mlflow.trackingUri"),
    ({"trackingUri": "http://mlflow:5000/?next=evil"}, "spec.tracking.mlflow.trackingUri"),
    ({"experiment": ""}, "spec.tracking.mlflow.experiment"),
    ({"experiment": "line\nbreak"}, "spec.tracking.mlflow.experiment"),
    ({"tags": {"kubetune.job-uid": "forged"}}, "spec.tracking.mlflow"),
    ({"tags": {"mlflow.user": "someone"}}, "spec.tracking.mlflow"),
    ({"tags": {"bad\"key": "x"}}, "spec.tracking.mlflow"),
    ({"tags": {f"k{i}": "v" for i in range(33)}}, "spec.tracking.mlflow.tags"),
    ({"tags": {"k": "v" * 1025}}, "spec.tracking.mlflow.tags.k"),
    ({"runName": "x" * 251}, "spec.tracking.mlflow.runName"),
])
def test_invalid_tracking_blocks_are_refused_naming_the_field(change, field):
    with pytest.raises(SpecError) as err:
        parse(_body(**change))
    assert any(line.startswith(field) for line in err.value.errors), err.value.errors


def test_the_crd_carries_tracking_spec_status_and_lineage():
    crd = yaml.safe_load((ROOT / "crds/finetunejobs.kubetune.io.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    mlflow = schema["spec"]["properties"]["tracking"]["properties"]["mlflow"]
    assert set(mlflow["required"]) == {"trackingUri", "experiment"}
    assert any("kubetune." in r["rule"] for r in mlflow["x-kubernetes-validations"])
    status = schema["status"]["properties"]
    assert {"runId", "url", "state"} <= set(status["tracking"]["properties"])
    assert {"datasetSha256", "trackingRunId"} <= set(status["artifact"]["properties"])


# ---- the operator: env, policy ----------------------------------------------------------------
SETTINGS = OperatorSettings(s3_endpoint="http://s3:8333", s3_credentials_secret="s3-creds")


def test_the_trainer_gets_the_tracking_secret_as_optional_env_and_nothing_without_one():
    body = _body()
    job = parse(body)
    env = res.training_job(job, body, 0, SETTINGS, False)["spec"]["template"]["spec"][
        "containers"][0]["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env
            if e["name"].startswith("MLFLOW_")}
    assert set(refs) == set(res.TRACKING_KEYS)
    assert all(r == {"name": "mlflow-credentials", "key": k, "optional": True}
               for k, r in refs.items())
    body = _body()
    del body["spec"]["tracking"]["mlflow"]["credentialsSecret"]
    env = res.training_job(parse(body), body, 0, SETTINGS, False)["spec"]["template"]["spec"][
        "containers"][0]["env"]
    assert not [e for e in env if e["name"].startswith("MLFLOW_")]


@pytest.mark.parametrize("allowed, uri, ok", [
    ([], "http://mlflow.mlops.svc:5000", False),
    (["http://mlflow.mlops.svc:5000"], "http://mlflow.mlops.svc:5000/", True),
    (["http://MLflow.mlops.svc:5000/"], "http://mlflow.mlops.svc:5000/prefix", True),
    (["https://mlflow.example.com"], "https://mlflow.example.com:443", True),
    (["https://mlflow.example.com"], "http://mlflow.example.com", False),
    (["http://mlflow.mlops.svc:5000"], "http://mlflow.mlops.svc:5001", False),
    (["*"], "https://anywhere.example.com", True),
])
def test_credentials_go_only_to_tracking_servers_the_admin_listed(allowed, uri, ok):
    settings = OperatorSettings(allowed_tracking_servers=allowed)
    errors = policy.finetunejob_errors(parse(_body(trackingUri=uri)), settings)
    assert (not errors) == ok, errors
    if not ok:
        assert errors[0].startswith("spec.tracking.mlflow.trackingUri:")
    body = _body(trackingUri=uri)
    del body["spec"]["tracking"]["mlflow"]["credentialsSecret"]
    assert policy.finetunejob_errors(parse(body), settings) == []  # nothing secret is sent


# ---- status.tracking from the summary -------------------------------------------------------
def _finished(summary: dict) -> tuple[list, list]:
    jobs = [{"metadata": {"name": "tracked-lora-0", "labels": {res.LABEL_ATTEMPT: "0"},
                          "creationTimestamp": "2026-11-28T11:00:00Z"}, "spec": {},
             "status": {"conditions": [{"type": "Complete", "status": "True",
                                        "reason": "CompletionsReached", "message": "",
                                        "lastTransitionTime": "2026-11-28T11:50:00Z"}]}}]
    pods = [{"metadata": {"name": "tracked-lora-0-abc", "labels": {
        "batch.kubernetes.io/job-name": "tracked-lora-0"},
        "creationTimestamp": "2026-11-28T11:00:01Z"}, "spec": {"nodeName": "gpu-0"},
        "status": {"phase": "Succeeded", "conditions": [], "containerStatuses": [{
            "name": "trainer", "state": {"terminated": {
                "exitCode": 0, "reason": "Completed",
                "message": TerminationSummary.model_validate(summary).render()}}}]}}]
    return jobs, pods


def _reconcile(body, jobs, pods, artifact=None):
    return rec.reconcile(rec.Observed(body, parse(body), [], jobs, pods, artifact), SETTINGS,
                         NOW)


ARTIFACT = {"uri": "s3://b/a/adapter", "manifestSha256": "c" * 64}


def test_the_run_reported_in_the_summary_lands_in_status_and_survives_the_pod():
    summary = {"status": "Succeeded", "artifact": ARTIFACT, "metrics": {"steps": 24},
               "tracking": {"system": "mlflow", "runId": RUN, "experimentId": "3",
                            "url": URL, "state": "Logged"}}
    body = _body()
    jobs, pods = _finished(summary)
    plan = _reconcile(body, jobs, pods)
    assert plan.status["tracking"] == {"runId": RUN, "experimentId": "3", "url": URL,
                                       "state": "Logged", "attempt": 0}
    assert not [e for e in plan.events if e[1].startswith("Tracking")]
    body["status"] = plan.status
    later = _reconcile(body, jobs, [])  # the pod is gone: status keeps what it said
    assert later.status["tracking"] == plan.status["tracking"]
    # A newer attempt's trainer wrote status.tracking while it runs: an older summary that is
    # still around does not overwrite it.
    live = {"runId": RUN, "url": URL, "state": "Logged", "attempt": 1}
    assert tracking.status({0: summary, 1: None}, live) == live
    assert tracking.status({0: summary}, {**live, "attempt": 0})["experimentId"] == "3"


def test_tracking_that_failed_is_a_warning_once_and_training_still_succeeds():
    summary = {"status": "Succeeded", "artifact": ARTIFACT, "metrics": {"steps": 24},
               "tracking": {"system": "mlflow", "state": "Failed",
                            "message": "no tracking run: experiments/get-by-name: "
                                       "ConnectionRefusedError"}}
    body = _body()
    jobs, pods = _finished(summary)
    verified = {**ARTIFACT, "method": "LoRA", "baseModelUri": "builtin://smollm2-135m-instruct"}
    plan = _reconcile(body, jobs, pods, verified)
    assert plan.status["phase"] == "Succeeded"
    assert plan.status["tracking"]["state"] == "Failed" and "runId" not in \
        plan.status["tracking"]
    (warning,) = [e for e in plan.events if e[1] == "TrackingFailed"]
    assert warning[0] == "Warning" and "ConnectionRefusedError" in warning[2]
    body["status"] = plan.status
    assert not [e for e in _reconcile(body, jobs, pods, verified).events
                if e[1] == "TrackingFailed"]


@pytest.mark.parametrize("reported, want", [
    ({"runId": "../../x", "url": "javascript:alert(1)", "state": "Logged"},
     {"state": "Logged", "attempt": 2}),
    ({"runId": RUN, "state": "Exploded", "message": "m" * 5000},
     {"runId": RUN, "message": "m" * 1000, "attempt": 2}),
    ({"url": "http://x/" + "y" * 3000}, None),
    ("not an object", None),
    ({}, None),
])
def test_a_hostile_report_is_cut_to_shape(reported, want):
    assert tracking.from_summary(reported, 2) == want


def test_the_adapter_records_the_run_the_verified_manifest_names():
    body = _body()
    job = parse(body)
    artifact = {**ARTIFACT, "baseModelUri": "builtin://smollm2-135m-instruct",
                "trackingRunId": RUN, "datasetSha256": "d" * 64}
    adapter = res.lora_adapter(job, body, artifact)
    assert adapter["metadata"]["annotations"][res.ANNOTATION_TRACKING_RUN] == RUN
    del artifact["trackingRunId"]
    assert res.ANNOTATION_TRACKING_RUN not in res.lora_adapter(job, body, artifact)[
        "metadata"]["annotations"]


def test_lineage_is_read_from_the_manifest_and_bounded():
    manifest = {"dataset": {"sha256": "d" * 64}, "tracking": {"runId": RUN}}
    about = artifacts.described(manifest)
    assert about["datasetSha256"] == "d" * 64 and about["trackingRunId"] == RUN
    hostile = artifacts.described({"dataset": {"sha256": "D" * 64},
                                   "tracking": {"runId": "x y" * 40}})
    assert hostile["datasetSha256"] is None and hostile["trackingRunId"] is None
    assert artifacts.described({"dataset": "x", "tracking": 5})["trackingRunId"] is None


def test_the_summary_carries_tracking_and_still_fits():
    summary = TerminationSummary.model_validate({
        "status": "Failed", "message": "x" * 5000, "metrics": {f"m{i}": "v" * 200
                                                            for i in range(40)},
        "tracking": {"runId": RUN, "url": URL, "state": "Degraded"}})
    text = summary.render()
    assert len(text.encode()) <= 4096
    assert json.loads(text)["tracking"]["runId"] == RUN
    assert TerminationSummary.parse('{"status": "Failed", "tracking": 7}').tracking is None


# ---- the trainer's REST client ----------------------------------------------------------------
def test_step_points_and_params_are_bounded_and_finite():
    event = {"event": "progress", "step": 4, "loss": 1.5, "eval_loss": 2.0,
             "learning_rate": float("nan"), "epoch": 0.5, "evaluated": False}
    assert {p["key"]: p["value"] for p in client.step_points(event, 1)} == {"loss": 1.5,
                                                                            "epoch": 0.5}
    assert [p["key"] for p in client.step_points({**event, "evaluated": True}, 1)] == [
        "loss", "eval_loss", "epoch"]
    assert client.step_points({**event, "final": True}, 1) == []
    assert client.step_points({**event, "step": True}, 1) == []
    cfg = from_finetunejob(parse(_body()))
    cfg.data.chat_template = "x"
    params = client.params(cfg, "d" * 64, 123)
    assert params["dataset.sha256"] == "d" * 64 and params["trainable_parameters"] == "123"
    assert params["max_steps"] == "24" and params["method"] == "LoRA"
    assert all(isinstance(v, str) and len(v) <= client.MAX_PARAM_VALUE for v in params.values())


def test_credentials_come_from_mlflows_own_variables():
    assert client.auth_header({"MLFLOW_TRACKING_TOKEN": "t"}) == "Bearer t"
    assert client.auth_header({"MLFLOW_TRACKING_USERNAME": "u",
                               "MLFLOW_TRACKING_PASSWORD": "p"}) == "Basic dTpw"
    assert client.auth_header({"MLFLOW_TRACKING_USERNAME": "u"}) is None


class _Handler(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_GET(self):  # noqa: N802 - http.server's name
        _Handler.seen.append((self.path, self.headers.get("Authorization")))
        if "redirect" in self.path:
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/stolen")
            self.end_headers()
        elif "huge" in self.path:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"[" + b"0," * (client.MAX_RESPONSE_BYTES // 2 + 10) + b"0]")
        else:
            body = json.dumps({"error_code": "RESOURCE_DOES_NOT_EXIST",
                               "message": "no such experiment"}).encode()
            self.send_response(404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Handler.seen = []
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_the_client_refuses_redirects_oversize_answers_and_names_error_codes(http_server):
    api = client.Client(http_server, timeout=5, env={"MLFLOW_TRACKING_TOKEN": "secret"})
    with pytest.raises(client.TrackingError, match="redirected"):
        api.call("GET", "redirect")
    assert [p for p, _ in _Handler.seen] == ["/api/2.0/mlflow/redirect"]  # never followed
    with pytest.raises(client.TrackingError, match="exceeds"):
        api.call("GET", "huge")
    with pytest.raises(client.TrackingError) as err:
        api.call("GET", "experiments/get-by-name", query={"experiment_name": "x"})
    assert err.value.code == "RESOURCE_DOES_NOT_EXIST" and "404" in str(err.value)
    assert _Handler.seen[-1][1] == "Bearer secret"
    with pytest.raises(client.TrackingError, match="no time left"):
        api.call("GET", "anything", deadline=0.0)


# ---- the dev cluster add-on -------------------------------------------------------------------
def test_the_mlflow_add_on_never_binds_every_interface_and_exports_its_url(tmp_path):
    from kubetune.devcluster import mlflow
    from kubetune.devcluster.cluster import ADDONS, ClusterState, DevCluster

    assert "mlflow" in ADDONS
    with pytest.raises(ValueError, match="never every interface"):
        mlflow.start(tmp_path / "m", host="0.0.0.0")
    ClusterState(dir=tmp_path, kubeconfig=str(tmp_path / "kubeconfig"),
                 s3={"endpoint": "http://10.200.0.1:8333", "access_key": "a",
                     "secret_key": "s", "bucket": "b"},
                 addons={"mlflow": {"url": "http://10.200.0.1:5055"}}).save()
    cluster = DevCluster(tmp_path, addons=("mlflow",))
    assert cluster.env()["KUBETUNE_MLFLOW_URL"] == "http://10.200.0.1:5055"
    assert cluster.host() == "10.200.0.1"  # where the pods reach the host, as S3 is
