"""Runtime templates (kubetune/api/runtime.py, the operator's runtimes.py): what a job gets from
its runtime, what it may not set, and that a started job keeps the values it started with."""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from kubetune.api import runtime as rt
from kubetune.api.finetunejob import ResourcesSpec, TrainingSpec
from kubetune.api.validation import parse
from kubetune_operator import policy, runtimes
from kubetune_operator.reconcile import finetunejob as rec
from kubetune_operator.settings import OperatorSettings

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 30, 12, 0, 0, tzinfo=timezone.utc)
SETTINGS = OperatorSettings(s3_endpoint="http://s3:8333", s3_credentials_secret="s3-creds")
RUNTIME = {"apiVersion": "kubetune.io/v1alpha1", "kind": "ClusterFineTuneRuntime",
           "metadata": {"name": "a100", "generation": 3},
           "spec": {"resources": {"image": "registry.corp/trainer:2", "gpusPerNode": 4,
                                  "nodeSelector": {"pool": "a100"},
                                  "serviceAccountName": "trainer-a100"},
                    "output": {"endpoint": "http://s3.corp:9000",
                               "credentialsSecret": {"name": "corp-s3"}},
                    "training": {"learningRate": 0.0002, "maxSteps": 500,
                                 "perDeviceBatchSize": 8},
                    "method": {"lora": {"r": 32, "alpha": 64}, "ia3": {"targetModules": ["q"]}},
                    "overridable": ["training.learningRate", "method.lora.r",
                                    "resources.gpusPerNode"]}}


def _job(**spec) -> dict:
    body = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "j", "namespace": "team", "uid": "u1", "generation": 1},
            "spec": {"baseModel": {"uri": "builtin://tiny-llama"},
                     "dataset": {"train": {"uri": "builtin://tiny-chat"}},
                     "method": {"type": "LoRA"}, "output": {"uri": "s3://team/out"},
                     "runtimeRef": {"name": "a100"}}}
    for path, value in spec.items():
        node = body["spec"]
        keys = path.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return body


def _read(found: dict | None):
    return lambda kind, ns, name: copy.deepcopy(found) if found and \
        found["metadata"]["name"] == name and found["kind"] == kind else None


def test_a_job_gets_the_runtimes_values_and_its_own_allowed_ones_win():
    out = runtimes.resolve(_job(training={"learningRate": 0.001}), _read(RUNTIME))
    assert out.errors == [] and out.error is None
    job = parse(out.body).spec
    assert job.resources.image == "registry.corp/trainer:2" and job.resources.gpus_per_node == 4
    assert job.resources.node_selector == {"pool": "a100"}
    assert job.output.endpoint == "http://s3.corp:9000"
    assert job.output.credentials_secret.name == "corp-s3"
    assert job.output.uri == "s3://team/out"  # not runtime-controlled
    assert job.training.learning_rate == 0.001 and job.training.max_steps == 500
    assert job.training.per_device_batch_size == 8
    assert job.method.lora.r == 32 and job.method.lora.alpha == 64
    assert job.method.ia3 is None  # only the blocks of the job's own method type
    assert out.status == {"kind": "ClusterFineTuneRuntime", "name": "a100", "generation": 3,
                          "values": RUNTIME["spec"]}
    assert out.trusted == RUNTIME["spec"]


def test_a_job_that_chooses_epochs_drops_the_runtimes_max_steps():
    job = parse(runtimes.resolve(_job(training={"epochs": 2}), _read(
        {**RUNTIME, "spec": {**RUNTIME["spec"], "overridable": ["training"]}})).body).spec
    assert job.training.epochs == 2 and job.training.max_steps is None


def test_locked_fields_are_named_with_the_runtime_and_what_a_job_may_set():
    out = runtimes.resolve(_job(resources={"image": "evil/trainer:1", "gpusPerNode": 2},
                                training={"learningRate": 0.1, "seed": 7},
                                method={"type": "LoRA", "lora": {"r": 8, "alpha": 8}}),
                           _read(RUNTIME))
    assert out.errors == [
        f"spec.{path}: locked by ClusterFineTuneRuntime a100 (fields a job may set: "
        f"training.learningRate, method.lora.r, resources.gpusPerNode)"
        for path in ("resources.image", "training.seed", "method.lora.alpha")]


def test_a_section_in_overridable_allows_all_of_its_fields():
    for section in ("resources", "training", "method", "output", "scheduling", "method.lora"):
        assert section in rt.CONTROLLED  # the chart's default runtime names sections
        rt.FineTuneRuntimeSpec.model_validate({"overridable": [section]})
    assert rt.allowed("training.seed", ["training"])
    assert not rt.allowed("trainingx.seed", ["training"])
    assert rt.locked_errors({"training": {"seed": 1, "epochs": 2}},
                            {"metadata": {"name": "r"}, "spec": {"overridable": ["training"]}},
                            "FineTuneRuntime") == []


def test_every_field_of_resources_and_training_is_runtime_controlled():
    for model, section in ((ResourcesSpec, "resources"), (TrainingSpec, "training")):
        for name, info in model.model_fields.items():
            assert f"{section}.{info.alias or rt._camel(name)}" in rt.CONTROLLED, name


def test_a_missing_runtime_says_so_and_a_started_job_keeps_what_it_started_with():
    missing = runtimes.resolve(_job(), _read(None))
    assert missing.body is None and "ClusterFineTuneRuntime a100 not found" in missing.error
    started = _job()
    started["status"] = {"startTime": "2026-11-30T10:00:00Z",
                         "runtime": runtimes.resolve(_job(), _read(RUNTIME)).status}
    changed = copy.deepcopy(RUNTIME)
    changed["spec"]["resources"]["image"] = "registry.corp/trainer:3"
    changed["metadata"]["generation"] = 4
    for read in (_read(changed), _read(None)):  # changed, or even deleted: the same values
        out = runtimes.resolve(started, read)
        assert out.error is None and out.generation == 3
        assert parse(out.body).spec.resources.image == "registry.corp/trainer:2"
    before = _job()  # not started yet: the runtime as it is now
    assert parse(runtimes.resolve(before, _read(changed)).body).spec.resources.image == \
        "registry.corp/trainer:3"


def test_a_clusters_runtime_values_pass_the_policy_a_namespaces_do_not():
    out = runtimes.resolve(_job(), _read(RUNTIME))
    job = parse(out.body)
    assert policy.finetunejob_errors(job, SETTINGS, out.trusted) == []
    local = {**RUNTIME, "kind": "FineTuneRuntime"}
    body = _job(runtimeRef={"kind": "FineTuneRuntime", "name": "a100"})
    out = runtimes.resolve(body, _read(local))
    assert out.trusted is None
    errors = policy.finetunejob_errors(parse(out.body), SETTINGS, out.trusted)
    assert [e.split(":")[0] for e in errors] == [
        "spec.resources.image", "spec.resources.serviceAccountName", "spec.output.endpoint"]


def test_a_job_waits_for_its_runtime_pending_with_one_warning_and_a_look_again():
    body = _job()
    world = rec.Observed(body, None, [], [], [], runtime_error="spec.runtimeRef: gone")
    plan = rec.reconcile(world, SETTINGS, NOW)
    assert plan.create == [] and plan.status["phase"] == "Pending"
    ready = next(c for c in plan.status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "RuntimeNotFound" and ready["status"] == "False"
    assert ("Warning", "RuntimeNotFound", "spec.runtimeRef: gone") in plan.events
    assert plan.requeue_after == rec.RUNTIME_LOOK_AGAIN
    body["status"] = plan.status
    again = rec.reconcile(rec.Observed(body, None, [], [], [],
                                       runtime_error="spec.runtimeRef: gone"), SETTINGS, NOW)
    assert not again.events  # said once


def test_the_resolved_job_starts_with_the_runtimes_image_and_records_the_runtime():
    out = runtimes.resolve(_job(), _read(RUNTIME))
    job = parse(out.body)
    world = rec.Observed(_job(), job, [], [], [], runtime=out.status)
    plan = rec.reconcile(world, SETTINGS, NOW)
    training = plan.create[-1]
    pod = training["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.corp/trainer:2"
    assert pod["nodeSelector"] == {"pool": "a100"}
    assert pod["serviceAccountName"] == "trainer-a100"
    # the first status waits for the attempt (START_WRITE_GRACE); it records the runtime
    assert not plan.status
    seen = {**training, "metadata": {**training["metadata"],
                                     "creationTimestamp": "2026-11-30T12:00:00Z"}}
    later = rec.reconcile(replace(world, jobs=[seen]), SETTINGS,
                          NOW + timedelta(seconds=rec.START_WRITE_GRACE))
    assert later.status["runtime"]["generation"] == 3 and later.status["phase"] == "Pending"


def test_the_admission_policy_checks_every_leaf_and_names_it():
    policies = [d for d in rt.admission() if d["kind"] == "ValidatingAdmissionPolicy"]
    assert [p["spec"]["paramKind"]["kind"] for p in policies] == [
        "ClusterFineTuneRuntime", "FineTuneRuntime"]
    for p in policies:
        messages = [v["messageExpression"] for v in p["spec"]["validations"]]
        assert len(messages) == len(rt._leaves())
        for leaf, message in zip(rt._leaves(), messages):
            assert message.startswith(f"'spec.{leaf}: locked by '")


def test_examples_with_a_runtime_parse():
    for path in sorted((ROOT / "examples").glob("*runtime*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "FineTuneJob":
                parse(doc)
