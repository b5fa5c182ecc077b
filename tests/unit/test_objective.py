"""Preference tuning in the API, the trainer config and the data loader: objective dpo is
refused at admission without preference data or with settings that have no meaning for it,
every refusal names its field, and preference records load into TRL's prompt/chosen/rejected
shape (or fail with one line)."""

import copy
import io
import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kubetune.api.crd import crd
from kubetune.api.validation import SpecError, parse
from kubetune.api.finetunejob import DatasetSpec
from kubetune.trainerconfig import TrainerConfig, default_learning_rate, from_finetunejob
from kubetune_trainer import builtin, data
from kubetune_operator.reconcile import finetunejob as rec
from kubetune_trainer.progress import preference_fields, to_status_progress
from test_finetunejob_reconcile import _body, _cond, _job, _pod, _run

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DPO = yaml.safe_load((ROOT / "examples/finetunejob-dpo.yaml").read_text())
SFT = yaml.safe_load((ROOT / "examples/finetunejob-lora.yaml").read_text())


def _with(base: dict, changes: dict) -> dict:
    obj = copy.deepcopy(base)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = obj
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return obj


# (id, base, changes, the field the error must name)
REFUSED = [
    ("dpo-on-chat-data", DPO, {"spec.dataset.format": "messages"}, "spec.dataset.format"),
    ("dpo-on-prompt-completion", DPO, {"spec.dataset.format": "promptCompletion"},
     "spec.dataset.format"),
    ("preference-data-with-sft", SFT, {"spec.dataset.format": "preference",
                                       "spec.dataset.assistantOnlyLoss": None,
                                       "spec.evaluationGate": None}, "spec.dataset.format"),
    ("dpo-block-with-sft", SFT, {"spec.dpo": {"beta": 0.2}}, "spec.dpo"),
    ("dpo-packing", DPO, {"spec.dataset.packing": True}, "spec.dataset.packing"),
    ("dpo-assistant-only-loss", DPO, {"spec.dataset.format": "auto",
                                      "spec.dataset.assistantOnlyLoss": True},
     "spec.dataset.assistantOnlyLoss"),
    ("dpo-pissa", DPO, {"spec.method.lora.init": "pissa"}, "spec.method.lora.init"),
    ("dpo-olora", DPO, {"spec.method.lora.init": "olora"}, "spec.method.lora.init"),
    ("dpo-gate-on-generation-score", DPO, {"spec.evaluationGate.scoreMetric":
                                           "normalizedMatch"}, "spec.evaluationGate.scoreMetric"),
    ("sft-gate-on-preference", SFT, {"spec.evaluationGate.scoreMetric": "preferenceAccuracy"},
     "spec.evaluationGate.scoreMetric"),
    ("dpo-beta-zero", DPO, {"spec.dpo.beta": 0}, "spec.dpo.beta"),
    ("dpo-loss-enum", DPO, {"spec.dpo.lossType": "kto"}, "spec.dpo.lossType"),
    ("dpo-exo-without-smoothing", DPO, {"spec.dpo.lossType": "exo_pair"},
     "spec.dpo.labelSmoothing"),
    ("dpo-smoothing-with-sigmoid", DPO, {"spec.dpo.labelSmoothing": 0.1},
     "spec.dpo.labelSmoothing"),
    ("dpo-smoothing-too-big", DPO, {"spec.dpo.lossType": "robust",
                                    "spec.dpo.labelSmoothing": 0.5}, "spec.dpo.labelSmoothing"),
    ("objective-enum", DPO, {"spec.objective": "ppo"}, "spec.objective"),
]


@pytest.mark.parametrize("name,base,changes,field", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_naming_the_field(name, base, changes, field):
    with pytest.raises(SpecError) as err:
        parse(_with(base, changes))
    assert any(line.startswith(field) for line in err.value.errors), err.value.errors


@pytest.mark.parametrize("changes", [
    {},
    {"spec.dataset.format": "auto"},
    {"spec.dpo": None},  # the defaults
    {"spec.dpo": {"lossType": "robust", "labelSmoothing": 0.1}},
    {"spec.dpo": {"lossType": "exo_pair", "labelSmoothing": 0.001, "sftWeight": 0.5}},
    {"spec.method": {"type": "PrefixTuning"}},
    {"spec.method": {"type": "Adapter"}},
    {"spec.method": {"type": "IA3"}},
    {"spec.method.lora.init": "gaussian"},
    {"spec.evaluation": {"score": False}},  # the preference metrics come from the eval pass
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "example")
def test_accepted(changes):
    assert parse(_with(DPO, changes)).spec.objective == "dpo"


def test_objective_defaults_to_sft_and_the_lora_example_is_unchanged():
    job = parse(SFT)
    assert job.spec.objective == "sft" and job.spec.dpo is None


def test_trainer_config_carries_the_objective_and_a_lower_default_learning_rate():
    job = parse(_with(DPO, {"spec.training.learningRate": None}))
    cfg = from_finetunejob(job)
    assert cfg.objective == "dpo"
    assert (cfg.dpo_settings.beta, cfg.dpo_settings.loss_type) == (0.1, "sigmoid")
    assert cfg.learning_rate == pytest.approx(default_learning_rate("LoRA") / 10)
    again = TrainerConfig.model_validate(yaml.safe_load(cfg.dump()))
    assert again.objective == "dpo" and again.dpo == cfg.dpo
    sft = from_finetunejob(parse(_with(SFT, {"spec.training.learningRate": None})))
    assert sft.objective == "sft" and sft.learning_rate == default_learning_rate("LoRA")


@pytest.mark.parametrize("changes,message", [
    ({"objective": "dpo", "data": {"train": {"uri": "builtin://tiny-chat"},
                                   "format": "messages"}}, "needs preference data"),
    ({"data": {"train": {"uri": "builtin://tiny-prefs"}, "format": "preference"}},
     "needs objective dpo"),
    ({"dpo": {"beta": 0.2}}, "only valid with objective dpo"),
    ({"objective": "dpo", "method": {"type": "LoRA", "lora": {"init": "pissa"}}},
     "rewrites the base weights"),
    ({"objective": "dpo", "data": {"train": {"uri": "builtin://tiny-prefs"}, "packing": True}},
     "do not apply to objective dpo"),
])
def test_hand_written_trainer_configs_are_checked_too(changes, message):
    cfg = {"model": {"uri": "builtin://tiny-llama"}, "data": {"train": {"uri": "builtin://x"}},
           "method": {"type": "LoRA"}, "output": {"uri": "s3://bucket/run"}, **changes}
    with pytest.raises(ValidationError, match=message):
        TrainerConfig.model_validate(cfg)


def test_the_dpo_block_is_immutable_once_started_present_or_not():
    rules = crd("FineTuneJob")["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "x-kubernetes-validations"]
    paths = {r["fieldPath"]: r["rule"] for r in rules}
    assert "self.spec.objective == oldSelf.spec.objective" in paths[".spec.objective"]
    assert "has(self.spec.dpo) == has(oldSelf.spec.dpo)" in paths[".spec.dpo"]


# ---- data -----------------------------------------------------------------------------------
def _spec(**kw) -> DatasetSpec:
    return DatasetSpec.model_validate({"train": {"uri": "builtin://x"}, **kw})


def test_auto_detects_preference_before_prompt_completion():
    records = [{"prompt": "Q", "chosen": "good", "rejected": "bad"}]
    assert data.detect_format(records, _spec()) == "preference"
    mapped = [{"question": "Q", "completion": "x", "good": "a", "bad": "b"}]
    spec = _spec(fields={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert data.detect_format(mapped, spec) == "preference"
    assert data.normalise(mapped, "preference", spec) == [
        {"prompt": "Q", "chosen": "a", "rejected": "b"}]


def test_chat_pairs_get_one_shape():
    records = [{"prompt": [{"role": "user", "content": "Q1"}], "chosen": "A", "rejected": "B"},
               {"prompt": "Q2", "chosen": [{"role": "assistant", "content": "C"}],
                "rejected": "D"}]
    pairs = data.normalise(records, "preference", _spec())
    assert pairs[1] == {"prompt": [{"role": "user", "content": "Q2"}],
                        "chosen": [{"role": "assistant", "content": "C"}],
                        "rejected": [{"role": "assistant", "content": "D"}]}
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "A"}]


@pytest.mark.parametrize("records,message", [
    ([{"prompt": "Q", "chosen": "A", "rejected": "A"}], "record 0: chosen and rejected are "),
    ([{"prompt": "Q", "chosen": "A", "rejected": "B"},
      {"prompt": "Q", "chosen": [{"role": "assistant", "content": "A"}], "rejected": "B"}],
     "record 1: chat messages, but the first record is plain text"),
    ([{"prompt": "Q", "chosen": "A", "rejected": "B"}, {"prompt": "Q", "chosen": "A"}],
     "record 1: missing field 'rejected'"),
    ([{"prompt": [{"role": "user"}], "chosen": "A", "rejected": "B"}],
     "record 0: 'prompt' must be a list of {role, content} objects"),
])
def test_bad_pairs_fail_with_one_line(records, message):
    with pytest.raises(data.DataError, match=message.replace("{", r"\{").replace("}", r"\}")):
        data.normalise(records, "preference", _spec())


@pytest.mark.parametrize("fmt,objective,message", [
    ("messages", "dpo", "objective dpo needs preference records"),
    ("preference", "sft", "train it with objective dpo"),
])
def test_data_must_fit_the_objective(fmt, objective, message):
    with pytest.raises(data.DataError, match=message):
        data.check_objective(fmt, objective)
    data.check_objective(fmt, {"dpo": "sft", "sft": "dpo"}[objective])  # the other one fits


def test_builtin_preference_splits_are_disjoint_and_deterministic():
    train, held_out = builtin.preference_records(), builtin.preference_records("eval")
    key = lambda r: r["prompt"][0]["content"]  # noqa: E731
    assert train and held_out and not {key(r) for r in train} & {key(r) for r in held_out}
    assert builtin.preference_records() == train
    assert all(r["chosen"] != r["rejected"] for r in train + held_out)
    reviews = builtin.review_preference_records("eval")
    assert len(reviews) == 120 and all(r["chosen"][0]["content"] in builtin.REVIEW_LABELS
                                       for r in reviews)


def test_dpo_progress_reaches_the_status():
    logs = {"loss": 0.6, "rewards/margins": 0.25, "rewards/accuracies": 0.75}
    fields = preference_fields(logs)
    assert fields == {"reward_margin": 0.25, "reward_accuracy": 0.75}
    status = to_status_progress({"step": 3, **fields})
    assert status == {"step": 3, "rewardMargin": 0.25, "rewardAccuracy": 0.75}
    assert preference_fields({"loss": 1.0}) == {}


def test_kubetune_run_prints_the_preference_score(tmp_path):
    from kubetune_trainer import local

    event = {"event": "score", "preferenceAccuracy": 0.7, "preferenceMargin": 4.81,
             "basePreferenceMargin": 4.317, "rewardMargin": 0.247}
    assert "base 4.317 -> fine-tuned 4.810; margin raised on 70% of the pairs" in \
        local.score_line(event)
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps(event) + "\n")

    out = io.StringIO()
    local.side_by_side(events, out)
    assert "base 4.317 -> fine-tuned" in out.getvalue()


DPO_METRICS = {"evalLoss": 0.62, "preferenceAccuracy": 0.7, "preferenceMargin": 4.81,
               "basePreferenceMargin": 4.32, "rewardMargin": 0.245}


@pytest.mark.parametrize("metrics,min_score,ok,reason", [
    (DPO_METRICS, 0.6, True, "WithinGate"),
    (DPO_METRICS, 0.8, False, "ScoreBelowGate"),
    ({"evalLoss": 0.62}, 0.6, False, "NoScore"),
])
def test_evaluation_gate_on_preference_accuracy(metrics, min_score, ok, reason):
    body = _body(objective="dpo", dataset=DPO["spec"]["dataset"],
                 evaluationGate={"minScore": min_score, "scoreMetric": "preferenceAccuracy"})
    body["spec"]["method"]["lora"].pop("init", None)
    pods = [_pod("quickstart-lora-0", "Succeeded", 0, '{"status": "Succeeded"}')]
    artifact = {"uri": "s3://b/a/adapter", "manifestSha256": "a" * 64, "method": "LoRA",
                "baseModelUri": "builtin://smollm2-135m-instruct", "metrics": metrics}
    plan = _run(body, [_job(0, [("Complete", "CompletionsReached", "")])], pods,
                artifact=artifact)
    assert plan.status["metrics"] == rec.final_metrics(metrics) == metrics
    passed = _cond(plan, "EvalPassed")
    assert (passed["status"] == "True") is ok and passed["reason"] == reason
    if reason == "NoScore":
        assert "preference pairs" in passed["message"]


def test_out_of_range_preference_accuracy_is_dropped():
    assert rec.final_metrics({"preferenceAccuracy": 1.5, "preferenceMargin": -2.0}) == {
        "preferenceMargin": -2.0}
