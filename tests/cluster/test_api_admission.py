"""Admission of FineTuneJob and LoRAAdapter by the real apiserver, table-driven.

Every invalid object is sent to the apiserver (schema, CEL) and to the pydantic models (the
source the CRDs are rendered from): both must reject it with a message naming the field."""

import copy
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from kubetune.api.validation import SpecError, parse

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / "examples" / name).read_text())


FTJ = _load("finetunejob-lora.yaml")
LORA = _load("loraadapter-hotswap.yaml")
DPO = _load("finetunejob-dpo.yaml")


def _set(obj: dict, path: str, value) -> None:
    """Set (or with value=DELETE, remove) a dotted path; [n] indexes lists."""
    keys = path.split(".")
    node = obj
    for key in keys[:-1]:
        if key.endswith("]"):
            name, idx = key[:-1].split("[")
            node = node[name][int(idx)]
        else:
            node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value


DELETE = object()

# (id, base, {path: value}, field the message must name)
CASES = [
    ("method-enum", FTJ, {"spec.method.type": "LoRAX"}, "spec.method.type"),
    ("negative-rank", FTJ, {"spec.method.lora.r": -1}, "spec.method.lora.r"),
    ("unknown-field", FTJ, {"spec.method.lora.rank": 8}, "spec.method.lora.rank"),
    ("missing-base-model", FTJ, {"spec.baseModel": DELETE}, "spec.baseModel"),
    ("qlora-bits-16", FTJ, {"spec.method.type": "QLoRA",
                            "spec.method.quantization": {"bits": 16}},
     "spec.method.quantization.bits"),
    ("prefix-with-merge", FTJ, {"spec.method": {"type": "PrefixTuning"},
                                "spec.output.merge": {"enabled": True}}, "spec.output.merge"),
    ("s3-uri-without-bucket", FTJ, {"spec.output.uri": "s3://"}, "spec.output.uri"),
    ("s3-model-without-bucket", FTJ, {"spec.baseModel.uri": "s3:///models/llama"},
     "spec.baseModel.uri"),
    ("dataset-scheme", FTJ, {"spec.dataset.train.uri": "ftp://data/train.jsonl"},
     "spec.dataset.train.uri"),
    ("bad-sha256", FTJ, {"spec.dataset.train.sha256": "abc123"}, "spec.dataset.train.sha256"),
    ("format-enum", FTJ, {"spec.dataset.format": "csv"}, "spec.dataset.format"),
    ("max-length-too-small", FTJ, {"spec.dataset.maxLength": 8}, "spec.dataset.maxLength"),
    ("eval-fraction-too-big", FTJ, {"spec.dataset.evalFraction": 0.9},
     "spec.dataset.evalFraction"),
    ("eval-and-fraction", FTJ, {"spec.dataset.evalFraction": 0.1},
     "spec.dataset.evalFraction"),
    ("assistant-loss-on-text", FTJ, {"spec.dataset.format": "text",
                                     "spec.dataset.assistantOnlyLoss": True},
     "spec.dataset.assistantOnlyLoss"),
    ("lora-block-with-ia3", FTJ, {"spec.method.type": "IA3"}, "spec.method.lora"),
    ("quantization-with-lora", FTJ, {"spec.method.quantization": {"bits": 4}},
     "spec.method.quantization"),
    ("loftq-with-fp4", FTJ, {"spec.method.type": "QLoRA", "spec.method.lora.init": "loftq",
                             "spec.method.quantization": {"quantType": "fp4"}},
     "spec.method.lora.init"),
    ("dropout-above-one", FTJ, {"spec.method.lora.dropout": 1.5}, "spec.method.lora.dropout"),
    ("epochs-and-max-steps", FTJ, {"spec.training.epochs": 2}, "spec.training"),
    ("zero-learning-rate", FTJ, {"spec.training.learningRate": 0},
     "spec.training.learningRate"),
    ("optimizer-enum", FTJ, {"spec.training.optimizer": "adam9000"}, "spec.training.optimizer"),
    ("prefix-with-checkpointing", FTJ, {"spec.method": {"type": "PrefixTuning"},
                                        "spec.training.gradientCheckpointing": True},
     "spec.training.gradientCheckpointing"),
    ("eval-gate-without-eval-data", FTJ, {"spec.evaluationGate": {"maxEvalLoss": 2.0},
                                          "spec.dataset.eval": DELETE},
     "spec.evaluationGate"),
    ("eval-gate-without-bounds", FTJ, {"spec.evaluationGate": {"scoreMetric": "exactMatch"}},
     "spec.evaluationGate"),
    ("score-gate-without-scoring", FTJ, {"spec.evaluation.score": False},
     "spec.evaluationGate.minScore"),
    ("min-score-above-one", FTJ, {"spec.evaluationGate": {"minScore": 1.5}},
     "spec.evaluationGate.minScore"),
    ("score-metric-enum", FTJ, {"spec.evaluationGate": {"minScore": 0.5,
                                                        "scoreMetric": "bleu"}},
     "spec.evaluationGate.scoreMetric"),
    ("too-many-gpus", FTJ, {"spec.resources.gpusPerNode": 17}, "spec.resources.gpusPerNode"),
    ("zero-nodes", FTJ, {"spec.resources.nodes": 0}, "spec.resources.nodes"),
    ("memory-not-quantity", FTJ, {"spec.resources.memory": "lots"}, "spec.resources.memory"),
    ("toleration-effect", FTJ, {"spec.resources.tolerations": [{"key": "a", "effect": "Never"}]},
     "spec.resources.tolerations[0].effect"),
    ("queue-name", FTJ, {"spec.scheduling.queueName": "Team_A"}, "spec.scheduling.queueName"),
    ("resume-enum", FTJ, {"spec.checkpointing.resume": "Sometimes"},
     "spec.checkpointing.resume"),
    ("negative-retries", FTJ, {"spec.retryPolicy.maxRetries": -1},
     "spec.retryPolicy.maxRetries"),
    ("endpoint-scheme", FTJ, {"spec.output.endpoint": "ftp://minio:9000"},
     "spec.output.endpoint"),
    ("output-on-hf", FTJ, {"spec.output.uri": "hf://org/model"}, "spec.output.uri"),
    ("zero-virtual-tokens", FTJ, {"spec.method": {"type": "PrefixTuning",
                                                  "prefix": {"numVirtualTokens": 0}}},
     "spec.method.prefix.numVirtualTokens"),
    ("adapter-activation", FTJ, {"spec.method": {"type": "Adapter",
                                                 "adapter": {"nonLinearity": "swish"}}},
     "spec.method.adapter.nonLinearity"),
    ("negative-ttl", FTJ, {"spec.ttlSecondsAfterFinished": -5}, "spec.ttlSecondsAfterFinished"),
    ("dpo-on-chat-data", DPO, {"spec.dataset.format": "messages"}, "spec.dataset.format"),
    ("dpo-block-with-sft", FTJ, {"spec.dpo": {"beta": 0.2}}, "spec.dpo"),
    ("dpo-packing", DPO, {"spec.dataset.packing": True}, "spec.dataset.packing"),
    ("dpo-pissa", DPO, {"spec.method.lora.init": "pissa"}, "spec.method.lora.init"),
    ("dpo-gate-on-generation-score", DPO, {"spec.evaluationGate.scoreMetric": "exactMatch"},
     "spec.evaluationGate.scoreMetric"),
    ("dpo-exo-without-smoothing", DPO, {"spec.dpo.lossType": "exo_pair"},
     "spec.dpo.labelSmoothing"),
    ("dpo-loss-enum", DPO, {"spec.dpo.lossType": "kto"}, "spec.dpo.lossType"),
    ("source-both", LORA, {"spec.source.uri": "s3://kubetune/a/adapter"}, "spec.source"),
    ("source-neither", LORA, {"spec.source.fromFineTuneJob": DELETE}, "spec.source"),
    ("runtime-enum", LORA, {"spec.target.runtime": "tgi"}, "spec.target.runtime"),
    ("port-range", LORA, {"spec.target.port": 70000}, "spec.target.port"),
    ("merged-without-target", LORA, {"spec.mode": "Merged", "spec.target": DELETE},
     "spec.target"),
    ("serving-name-space", LORA, {"spec.servingName": "my adapter"}, "spec.servingName"),
    ("max-unavailable", LORA, {"spec.rollout": {"maxUnavailable": "abc"}},
     "spec.rollout.maxUnavailable"),
    ("requirement-type", LORA, {"spec.promotion": {"requires": [{"conditionType": "evalPassed"}]}},
     "spec.promotion.requires[0].conditionType"),
    ("stage-pattern", LORA, {"spec.stage": "Production!"}, "spec.stage"),
    ("max-rank-zero", LORA, {"spec.compatibility.maxRank": 0}, "spec.compatibility.maxRank"),
    ("tracking-uri-with-credentials", FTJ, {"spec.tracking": {"mlflow": {
        "trackingUri": "http://user:pw@mlflow:5000", "experiment": "e"}}},
     "spec.tracking.mlflow.trackingUri"),
    ("tracking-without-experiment", FTJ, {"spec.tracking": {"mlflow": {
        "trackingUri": "http://mlflow:5000"}}}, "spec.tracking.mlflow.experiment"),
    ("tracking-reserved-tag", FTJ, {"spec.tracking": {"mlflow": {
        "trackingUri": "http://mlflow:5000", "experiment": "e",
        "tags": {"kubetune.job-uid": "forged"}}}}, "spec.tracking.mlflow.tags"),
    ("tracking-bad-tag-key", FTJ, {"spec.tracking": {"mlflow": {
        "trackingUri": "http://mlflow:5000", "experiment": "e", "tags": {"a\"b": "x"}}}},
     "spec.tracking.mlflow.tags"),
]


def _mutated(base: dict, changes: dict, name: str) -> dict:
    obj = copy.deepcopy(base)
    obj["metadata"] = {"name": f"bad-{name}"}
    for path, value in changes.items():
        _set(obj, path, value)
    return obj


def _create(api, namespace: str, obj: dict, dry_run: bool = True) -> dict:
    plural = "finetunejobs" if obj["kind"] == "FineTuneJob" else "loraadapters"
    return client.CustomObjectsApi(api).create_namespaced_custom_object(
        "kubetune.io", "v1alpha1", namespace, plural, obj,
        dry_run="All" if dry_run else None, field_validation="Strict")


@pytest.mark.parametrize("name,base,changes,field", CASES, ids=[c[0] for c in CASES])
def test_invalid_object_is_rejected_naming_the_field(cluster, crds, name, base, changes, field):
    obj = _mutated(base, changes, name)
    with pytest.raises(ApiException) as err:
        _create(cluster.api, "default", obj)
    assert err.value.status in (400, 422), err.value.body
    assert field in err.value.body, err.value.body

    with pytest.raises(SpecError) as spec_err:
        parse(obj)
    assert any(line.startswith(field) or f"{field}" in line for line in spec_err.value.errors), \
        spec_err.value.errors


def test_at_least_25_invalid_objects():
    assert len(CASES) >= 25


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_is_accepted_by_apiserver_and_models(cluster, crds, namespace, path):
    obj = yaml.safe_load(path.read_text())
    parse(obj)
    cluster.kubectl("apply", "-n", namespace, "-f", str(path))
    kind = obj["kind"].lower()
    got = cluster.kubectl("get", kind, obj["metadata"]["name"], "-n", namespace, "-o", "yaml")
    stored = yaml.safe_load(got.stdout)
    if kind == "finetunejob":
        # Stored as written (a runtime template can tell what the user set); the defaults are
        # the models', applied when the operator parses it.
        assert stored["spec"] == obj["spec"]
        assert parse(stored).spec.checkpointing.resume == "Latest"
    elif kind == "loraadapter":  # defaulted by the apiserver (structural schema)
        assert stored["spec"]["compatibility"]["enforce"] in (True, False)
    else:
        assert stored["spec"]["overridable"] == obj["spec"].get("overridable", [])
    if kind == "clusterfinetuneruntime":  # not deleted with the test's namespace
        cluster.kubectl("delete", kind, obj["metadata"]["name"])


def test_printer_columns(cluster, crds, namespace):
    cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples/finetunejob-lora.yaml"),
                    "-f", str(ROOT / "examples/loraadapter-hotswap.yaml"))
    api = client.CustomObjectsApi(cluster.api)
    api.patch_namespaced_custom_object_status(
        "kubetune.io", "v1alpha1", namespace, "finetunejobs", "quickstart-lora",
        {"status": {"phase": "Running", "progress": {"percent": 42.5, "step": 17},
                    "metrics": {"normalizedMatch": 0.95, "exactMatch": 0.9},
                    "conditions": [{"type": "Ready", "status": "False", "reason": "Training",
                                    "message": "step 17/40",
                                    "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
    api.patch_namespaced_custom_object_status(
        "kubetune.io", "v1alpha1", namespace, "loraadapters", "assistant-v1",
        {"status": {"loadedReplicas": "2/2", "resolvedMode": "HotSwap", "conditions": [
            {"type": "Ready", "status": "True", "reason": "Loaded", "message": "",
             "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
    ftj = cluster.kubectl("get", "ftj", "-n", namespace).stdout.splitlines()
    assert ftj[0].split() == ["NAME", "PHASE", "READY", "METHOD", "RUNTIME", "PROGRESS", "SCORE",
                              "AGE"]  # RUNTIME is blank here: split() drops it from the row
    assert ftj[1].split()[:6] == ["quickstart-lora", "Running", "False", "LoRA", "42.5", "0.95"]
    wide = cluster.kubectl("get", "ftj", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert wide[0].split()[:10] == ["NAME", "PHASE", "READY", "METHOD", "RUNTIME", "PROGRESS",
                                    "STEP", "LOSS", "SCORE", "REASON"]
    lora = cluster.kubectl("get", "lora", "-n", namespace).stdout.splitlines()
    assert lora[0].split() == ["NAME", "SERVING", "STAGE", "MODE", "LOADED", "READY", "AGE"]
    assert lora[1].split()[:6] == ["assistant-v1", "assistant-v1", "production", "HotSwap",
                                   "2/2", "True"]
    everything = cluster.kubectl("get", "kubetune", "-n", namespace).stdout
    assert "finetunejob.kubetune.io/quickstart-lora" in everything
    assert "loraadapter.kubetune.io/assistant-v1" in everything


def test_training_inputs_immutable_once_started_but_scheduling_mutable(cluster, crds, namespace):
    obj = _mutated(FTJ, {}, "immutable")
    obj["metadata"] = {"name": "immutable"}
    _create(cluster.api, namespace, obj, dry_run=False)
    api = client.CustomObjectsApi(cluster.api)
    group = ("kubetune.io", "v1alpha1", namespace, "finetunejobs", "immutable")

    # Before it started, training inputs may still change.
    api.patch_namespaced_custom_object(*group, {"spec": {"method": {"lora": {"r": 8}}}})
    api.patch_namespaced_custom_object_status(*group, {"status": {
        "startTime": "2026-01-01T00:00:00Z"}})

    for patch, field in [({"method": {"lora": {"r": 4}}}, "spec.method"),
                         ({"baseModel": {"revision": "v2"}}, "spec.baseModel"),
                         ({"dataset": {"maxLength": 512}}, "spec.dataset"),
                         ({"training": {"learningRate": 0.1}}, "spec.training")]:
        with pytest.raises(ApiException) as err:
            api.patch_namespaced_custom_object(*group, {"spec": patch})
        assert err.value.status == 422
        assert f"{field} is immutable once the job has started" in err.value.body

    # suspend and scheduling stay mutable.
    api.patch_namespaced_custom_object(*group, {"spec": {"scheduling": {
        "suspend": True, "queueName": "team-b"}}})
    got = api.get_namespaced_custom_object(*group)
    assert got["spec"]["scheduling"] == {"suspend": True, "queueName": "team-b"}
    assert got["spec"]["method"]["lora"]["r"] == 8


SERVING = sorted((ROOT / "examples" / "serving").glob("*.yaml"))


@pytest.mark.parametrize("path", SERVING, ids=[p.stem for p in SERVING])
def test_serving_example_validates_on_the_apiserver(cluster, namespace, path):
    out = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path))
    assert "(server dry run)" in out.stdout
