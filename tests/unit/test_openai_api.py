"""`kubetune api`'s pure parts: request -> FineTuneJob mapping, FineTuneJob -> OpenAI objects,
uploaded-file conversion, ids, keys and error shapes."""

from __future__ import annotations

import base64
import json

import pytest

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.openai_api import datafiles, ids, jobspec, keys, views
from kubetune.openai_api.config import Settings, parse_models
from kubetune.openai_api.errors import ApiError, error_body
from kubetune.openai_api.server import _check_spec, _route, parse_multipart

pytestmark = pytest.mark.unit
JOB_ID = "ftjob-0123456789abcdef01234567"
FILE_ID = "file-0123456789abcdef01234567"
SETTINGS = Settings(storage_uri="s3://bucket/api", models={"tiny": "builtin://tiny-llama"})
CHAT_FILE = {"id": FILE_ID, "kind": "chat", "uri": "s3://bucket/api/files/ns/f.jsonl",
             "sha256": "a" * 64}
PREF_FILE = {**CHAT_FILE, "kind": "preference"}


def build(body: dict, files: dict | None = None, settings: Settings = SETTINGS) -> dict:
    return jobspec.build_job({"model": "tiny", "training_file": FILE_ID, **body}, JOB_ID,
                             files or {FILE_ID: CHAT_FILE}, settings)


def code_of(call) -> tuple[int, str | None]:
    with pytest.raises(ApiError) as err:
        call()
    return err.value.status, err.value.param


# ---- request -> spec ------------------------------------------------------------------------
@pytest.mark.parametrize("hp, training", [
    ({}, {}),
    ({"n_epochs": 3}, {"epochs": 3}),
    ({"n_epochs": 3.0}, {"epochs": 3}),
    ({"batch_size": 16}, {"perDeviceBatchSize": 8, "gradientAccumulationSteps": 2}),
    ({"batch_size": 6}, {"perDeviceBatchSize": 6, "gradientAccumulationSteps": 1}),
    ({"batch_size": 17}, {"perDeviceBatchSize": 1, "gradientAccumulationSteps": 17}),
    ({"batch_size": 36}, {"perDeviceBatchSize": 6, "gradientAccumulationSteps": 6}),
    ({"learning_rate_multiplier": 2}, {"learningRate": 1e-3}),
    ({"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}, {}),
])
def test_supervised_hyperparameters_map_to_training(hp, training):
    for body in ({"hyperparameters": hp},
                 {"method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}):
        spec = build(body)["spec"]
        assert spec["training"] == training
        assert spec["objective"] == "sft" and spec["dataset"]["format"] == "messages"
        assert "dpo" not in spec


def test_dpo_maps_beta_objective_and_a_tenth_of_the_learning_rate():
    spec = build({"method": {"type": "dpo", "dpo": {"hyperparameters": {
        "beta": 0.3, "learning_rate_multiplier": 1}}}}, {FILE_ID: PREF_FILE})["spec"]
    assert spec["objective"] == "dpo" and spec["dpo"] == {"beta": 0.3}
    assert spec["dataset"]["format"] == "preference"
    assert spec["training"]["learningRate"] == pytest.approx(5e-5)
    auto = build({"method": {"type": "dpo"}}, {FILE_ID: PREF_FILE})["spec"]
    assert "dpo" not in auto  # beta auto: the spec's default (0.1)


def test_mapped_spec_is_a_valid_finetunejob_with_pinned_data_and_serving_name():
    job = build({"suffix": "colours", "seed": 9, "validation_file": FILE_ID})
    spec = FineTuneJobSpec.model_validate(job["spec"])
    assert spec.dataset.train.sha256 == "a" * 64 and spec.dataset.eval is not None
    assert spec.output.uri == f"s3://bucket/api/jobs/{JOB_ID}"
    assert spec.output.create_adapter.serving_name == "ft-tiny-colours-01234567"
    assert spec.training.seed == 9
    assert job["metadata"]["name"] == JOB_ID
    assert job["metadata"]["labels"] == {jobspec.LABEL: "true"}


def test_settings_runtime_target_and_defaults_are_applied_under_the_mapping():
    settings = Settings(storage_uri="s3://b/p", models={"tiny": "builtin://tiny-llama"},
                        runtime="gpu", serve_deployment="chat", s3_endpoint="http://s3:9000",
                        spec_defaults={"training": {"epochs": 5, "loggingSteps": 2},
                                       "resources": {"gpusPerNode": 0}})
    spec = build({"hyperparameters": {"n_epochs": 2}}, settings=settings)["spec"]
    assert spec["runtimeRef"] == {"kind": "ClusterFineTuneRuntime", "name": "gpu"}
    assert spec["output"]["createAdapter"]["target"] == {"deployment": "chat"}
    assert "endpoint" not in spec["output"]  # the server's own S3 is not the job's setting
    assert spec["training"] == {"epochs": 2, "loggingSteps": 2}  # the request wins
    assert spec["resources"] == {"gpusPerNode": 0}


@pytest.mark.parametrize("body, param", [
    ({"model": "gpt-4o"}, "model"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": 1.5}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": True}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": 257}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": 0}},
     "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"learning_rate_multiplier": "2"}},
     "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"beta": 0.1}}, "hyperparameters.beta"),  # supervised has no beta
    ({"method": {"type": "reinforcement"}}, "method.type"),
    ({"method": {"type": "dpo", "supervised": {}}}, "method.supervised"),
    ({"method": {"type": "supervised"}, "hyperparameters": {"n_epochs": 1}},
     "hyperparameters"),
    ({"suffix": "has space"}, "suffix"),
    ({"seed": -1}, "seed"),
    ({"metadata": {"k": 1}}, "metadata"),
    ({"integrations": [{"type": "wandb"}]}, "integrations"),
    ({"unknown": 1}, "unknown"),
])
def test_bad_requests_are_400_naming_the_parameter(body, param):
    assert code_of(lambda: build(body)) == (400, param)


def test_method_and_file_kind_must_agree():
    assert code_of(lambda: build({}, {FILE_ID: PREF_FILE})) == (400, "training_file")
    assert code_of(lambda: build({"method": {"type": "dpo"}})) == (400, "training_file")


def test_spec_defaults_that_break_the_spec_are_a_400_naming_the_field():
    settings = Settings(storage_uri="s3://b/p", models={"tiny": "builtin://tiny-llama"},
                        spec_defaults={"training": {"optimizer": "nope"}})
    job = build({}, settings=settings)
    with pytest.raises(ApiError) as err:
        _check_spec(job["spec"])
    assert err.value.status == 400 and "spec.training.optimizer" in err.value.message


def test_model_catalog_pairs():
    assert parse_models(["a=builtin://tiny-llama", "b.c=hf://x/y@r"]) == {
        "a": "builtin://tiny-llama", "b.c": "hf://x/y@r"}
    for bad in ("noequals", "=uri", "bad name=uri", "a="):
        with pytest.raises(ValueError):
            parse_models([bad])


# ---- FineTuneJob -> OpenAI objects ----------------------------------------------------------
def ftj(phase=None, annotations=None, **status) -> dict:
    job = build({"hyperparameters": {"n_epochs": 2}})
    job["metadata"].update(namespace="team-a", uid="u1",
                           creationTimestamp="2026-01-01T00:00:00Z")
    job["metadata"]["annotations"].update(annotations or {})
    job["status"] = {"phase": phase, **status} if phase else {}
    return job


@pytest.mark.parametrize("phase, expected", [
    (None, "validating_files"), ("Pending", "queued"), ("Queued", "queued"),
    ("Suspended", "queued"), ("Running", "running"), ("Succeeded", "succeeded"),
    ("Failed", "failed")])
def test_phase_maps_to_openai_status(phase, expected):
    assert views.job_status(ftj(phase)) == expected


def test_cancelled_unless_it_had_succeeded():
    cancel = {jobspec.CANCEL_ANNOTATION: "2026-01-01T00:05:00Z"}
    assert views.job_status(ftj("Suspended", cancel)) == "cancelled"
    assert views.job_status(ftj("Failed", cancel)) == "cancelled"
    assert views.job_status(ftj("Succeeded", cancel, adapterRef="a")) == "succeeded"
    obj = views.job_object(ftj("Suspended", cancel), now=0)
    assert obj["finished_at"] == 1767225900 and obj["error"] is None


def test_job_object_of_a_succeeded_job_names_the_adapter():
    obj = views.job_object(ftj("Succeeded", adapterRef=JOB_ID,
                               completionTime="2026-01-01T01:00:00Z"), now=0)
    assert obj["status"] == "succeeded" and obj["fine_tuned_model"] == "ft-tiny-01234567"
    assert obj["finished_at"] == 1767229200 and obj["created_at"] == 1767225600
    assert obj["hyperparameters"] == {"n_epochs": 2, "batch_size": "auto",
                                      "learning_rate_multiplier": "auto"}
    assert obj["method"]["type"] == "supervised" and obj["training_file"] == FILE_ID
    running = views.job_object(ftj("Running", progress={"etaSeconds": 60}), now=100)
    assert running["fine_tuned_model"] is None and running["estimated_finish"] == 160


def test_failed_job_carries_the_failed_condition_as_error():
    failed = ftj("Failed", conditions=[{"type": "Failed", "status": "True",
                                        "reason": "BackoffLimitExceeded", "message": "OOM"}])
    assert views.job_object(failed, now=0)["error"] == {
        "code": "BackoffLimitExceeded", "message": "OOM", "param": None}


def test_events_from_status_attempts_progress_and_kubernetes_events_newest_first():
    obj = ftj("Running", conditions=[
        {"type": "Running", "status": "True", "reason": "Started",
         "lastTransitionTime": "2026-01-01T00:01:00Z"}],
        attempts=[{"number": 0, "startedAt": "2026-01-01T00:01:00Z",
                   "finishedAt": "2026-01-01T00:02:00Z", "reason": "Preempted"}],
        progress={"step": 5, "totalSteps": 10, "loss": 1.5,
                  "updatedAt": "2026-01-01T00:03:00Z"})
    kube = [{"type": "Warning", "reason": "Retrying", "message": "attempt 1",
             "lastTimestamp": "2026-01-01T00:02:30Z"}]
    events = views.job_events(obj, kube)
    messages = [e["message"] for e in events]
    assert messages[0] == "Step 5/10: training loss=1.5000"
    assert events[0]["type"] == "metrics" and events[0]["data"]["train_loss"] == 1.5
    assert messages[1] == "Retrying: attempt 1" and events[1]["level"] == "warn"
    assert "Attempt 0 ended: Preempted" in messages
    assert messages[-1] == f"Created fine-tuning job: {JOB_ID}"
    assert all(ids.EVENT_ID.match(e["id"]) for e in events)
    assert views.job_events(obj, kube) == events  # ids are stable across reads


def test_checkpoints_list_the_final_adapter_first():
    obj = ftj("Succeeded", adapterRef=JOB_ID, completionTime="2026-01-01T01:00:00Z",
              metrics={"steps": 30, "trainLoss": 0.5})
    found = views.job_checkpoints(obj, [(10, 5), (20, 6), (30, 7)])
    assert [c["step_number"] for c in found] == [30, 20, 10]
    assert found[0]["fine_tuned_model_checkpoint"] == "ft-tiny-01234567"
    assert found[0]["metrics"] == {"step": 30, "train_loss": 0.5}
    assert found[1]["fine_tuned_model_checkpoint"] == "ft-tiny-01234567-step-20"
    assert all(ids.CHECKPOINT_ID.match(c["id"]) for c in found)
    assert views.job_checkpoints(ftj("Running"), []) == []


def test_pages_follow_the_after_cursor():
    items = [{"id": f"x{i}"} for i in range(5)]
    first = views.page(items, None, "2")
    assert [i["id"] for i in first["data"]] == ["x0", "x1"] and first["has_more"]
    last = views.page(items, "x3", "2")
    assert [i["id"] for i in last["data"]] == ["x4"] and not last["has_more"]
    for after, limit in ((None, "0"), (None, "101"), (None, "x"), ("nope", None)):
        assert code_of(lambda: views.page(items, after, limit))[0] == 400


# ---- uploaded files -------------------------------------------------------------------------
def lines(*records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def test_chat_file_keeps_role_and_content_and_joins_text_parts():
    kind, body, count = datafiles.convert_jsonl(lines(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                   {"type": "text", "text": "b"}]},
                      {"role": "assistant", "content": "c", "weight": 1}]}) + b"\n")
    assert (kind, count) == ("chat", 1)
    assert json.loads(body) == {"messages": [{"role": "user", "content": "ab"},
                                             {"role": "assistant", "content": "c"}]}


def test_preference_file_becomes_prompt_chosen_rejected():
    kind, body, _ = datafiles.convert_jsonl(lines({
        "input": {"messages": [{"role": "user", "content": "sky?"}]},
        "preferred_output": [{"role": "assistant", "content": "Blue."}],
        "non_preferred_output": [{"role": "assistant", "content": "Green."}]}))
    assert kind == "preference"
    assert json.loads(body) == {"prompt": [{"role": "user", "content": "sky?"}],
                                "chosen": [{"role": "assistant", "content": "Blue."}],
                                "rejected": [{"role": "assistant", "content": "Green."}]}


CHAT = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
PREF = {"input": {"messages": [{"role": "user", "content": "q"}]},
        "preferred_output": [{"role": "assistant", "content": "a"}],
        "non_preferred_output": [{"role": "assistant", "content": "b"}]}


@pytest.mark.parametrize("data, needle", [
    (b"", "no records"),
    (b"\xff\xfe", "not UTF-8"),
    (lines(CHAT) + b"[1]\n", "line 2: a JSON object"),
    (lines(CHAT, PREF), "line 2: a preference record in a file of chat records"),
    (lines({"messages": [{"role": "user", "content": "q"}]}), "at least one assistant"),
    (lines({"messages": [{"role": "tool", "content": "q"}]}), "role must be one of"),
    (lines({"messages": [{"role": "assistant", "content": ""}]}), "non-empty string"),
    (lines({"messages": [{"role": "assistant", "content": "a", "weight": 0}]}), "weight 0"),
    (lines({**CHAT, "tools": []}), "tools"),
    (lines({**PREF, "preferred_output": PREF["non_preferred_output"]}), "same answer"),
    (lines({**PREF, "preferred_output": [{"role": "user", "content": "a"}]}),
     "exactly one assistant"),
])
def test_bad_files_are_refused_naming_the_line(data, needle):
    with pytest.raises(ApiError) as err:
        datafiles.convert_jsonl(data)
    assert err.value.status == 400 and needle in err.value.message
    assert err.value.param == "file"


def test_multipart_fields_are_parsed():
    body = (b"--B\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.jsonl\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n{\"a\": 1}\n\r\n--B--\r\n")
    fields = parse_multipart("multipart/form-data; boundary=B", body)
    assert fields["purpose"] == (None, b"fine-tune")
    assert fields["file"] == ("d.jsonl", b'{"a": 1}\n')
    with pytest.raises(ApiError) as err:
        parse_multipart("application/json", b"{}")
    assert err.value.status == 415


# ---- ids, keys, errors, routes --------------------------------------------------------------
def test_ids_are_checked_before_use():
    assert ids.JOB_ID.match(ids.new_job_id()) and ids.FILE_ID.match(ids.new_file_id())
    assert ids.checked("job", JOB_ID) == JOB_ID
    for bad in ("ftjob-../x", JOB_ID + "0", JOB_ID.upper(), None, 5, FILE_ID):
        assert code_of(lambda: ids.checked("job", bad, "id")) == (400, "id")


def secret(key: str, namespace: str) -> dict:
    return {"data": {"key": base64.b64encode(key.encode()).decode(),
                     "namespace": base64.b64encode(namespace.encode()).decode()}}


def test_keys_map_to_their_namespace_and_bad_entries_are_skipped():
    known = keys.entries([secret("k" * 20, "team-a"), secret("j" * 20, "team-b"),
                          secret("short", "team-c"), secret("x" * 20, "Bad_NS"),
                          {"data": {"key": "!!notbase64"}}])
    assert len(known) == 2
    assert keys.namespace_for("k" * 20, known) == "team-a"
    assert keys.namespace_for("j" * 20, known) == "team-b"
    assert keys.namespace_for("k" * 19, known) is None
    assert keys.bearer("Bearer abc") == "abc" and keys.bearer("Basic abc") is None
    assert keys.bearer(None) is None and keys.bearer("Bearer ") is None


def test_key_ring_rereads_the_secrets_after_its_ttl():
    loaded = [[secret("k" * 20, "team-a")], []]
    ring = keys.KeyRing(lambda: loaded.pop(0), ttl=0)
    assert ring.namespace("k" * 20) == "team-a"
    assert ring.namespace("k" * 20) is None  # revoked
    assert ring.namespace(None) is None


def test_errors_have_openais_shape():
    assert error_body(404, "No such thing", "id", "not_found") == {"error": {
        "message": "No such thing", "type": "invalid_request_error", "param": "id",
        "code": "not_found"}}
    assert error_body(504, "slow")["error"]["type"] == "server_error"


def test_routes_answer_404_and_405():
    assert _route("GET", f"/v1/fine_tuning/jobs/{JOB_ID}/events") == ("job_events", (JOB_ID,))
    assert code_of(lambda: _route("PUT", "/v1/fine_tuning/jobs"))[0] == 405
    assert code_of(lambda: _route("GET", "/v1/models"))[0] == 404
