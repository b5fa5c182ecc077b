"""The task score's pure parts: normalisation, what is scored, status.metrics from a manifest,
the evaluation gate on a score, per-method learning rates and the comparison's plan/table."""

import copy
import math
from pathlib import Path

import pytest
import yaml

from kubetune.api.validation import SpecError, parse
from kubetune_operator.reconcile import finetunejob as rec
from kubetune_trainer import builtin, compare, scoring
from kubetune.trainerconfig import from_finetunejob
from kubetune.trainerconfig import DEFAULT_LEARNING_RATES

from test_finetunejob_reconcile import _body, _cond, _job, _pod, _run

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("answer,reference,exact,loose", [
    ("positive", "positive", True, True),
    ("Positive.", "positive", False, True),
    ("  The answer is: mixed!", "mixed", False, False),
    ("The mixed", "mixed", False, True),  # articles go
    ("Paris,  France", "paris france", False, True),
    ("This review is positive.", "positive", False, False),
])
def test_normalised_match(answer, reference, exact, loose):
    assert (answer.strip() == reference) is exact
    assert (scoring.normalise(answer) == scoring.normalise(reference)) is loose


def test_scored_examples_are_the_last_assistant_turn_or_the_completion():
    chat = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                          {"role": "assistant", "content": "a1"},
                          {"role": "user", "content": "q2"},
                          {"role": "assistant", "content": "a2"}]},
            {"messages": [{"role": "user", "content": "no answer"}]},
            {"messages": [{"role": "assistant", "content": "no prompt"}]}]
    [only] = scoring.examples(chat, "messages", 10)
    assert only.reference == "a2" and [m["content"] for m in only.prompt] == \
        ["s", "q1", "a1", "q2"]
    pc = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    assert [e.reference for e in scoring.examples(pc, "promptCompletion", 3)] == \
        ["c0", "c1", "c2"]
    assert scoring.examples([{"text": "x"}], "text", 10) == []


def test_review_task_splits_are_disjoint_balanced_and_deterministic():
    train, held_out = builtin.review_records()
    assert (len(train), len(held_out)) == (480, 120)
    prompts = {r["messages"][0]["content"] for r in train}
    assert not prompts & {r["messages"][0]["content"] for r in held_out}
    labels = [r["messages"][1]["content"] for r in train]
    assert set(labels) == set(builtin.REVIEW_LABELS)
    assert min(labels.count(x) for x in builtin.REVIEW_LABELS) > 100
    assert builtin.review_records() == (train, held_out)


def test_final_metrics_keep_known_numbers_only():
    raw = {"trainLoss": 0.5, "evalLoss": 0.25, "exactMatch": 0.9, "normalizedMatch": 1.0,
           "scoreSamples": 60, "steps": 24, "tokensPerSecond": 100.5,
           "trainLosses": [1, 2], "answers": [{"prompt": "x"}], "injected": "text"}
    assert rec.final_metrics(raw) == {k: raw[k] for k in (
        "trainLoss", "evalLoss", "exactMatch", "normalizedMatch", "scoreSamples", "steps",
        "tokensPerSecond")}
    bad = rec.final_metrics({"exactMatch": 7.0, "evalLoss": math.nan, "steps": True,
                             "normalizedMatch": "1"})
    assert bad is None
    assert rec.final_metrics(["not", "a", "dict"]) is None


def _succeeded(metrics: dict, gate: dict):
    body = _body(evaluationGate=gate)
    jobs = [_job(0, [("Complete", "CompletionsReached", "")])]
    pods = [_pod("quickstart-lora-0", "Succeeded", 0,
                 '{"status": "Succeeded", "metrics": {"steps": 24}}')]
    artifact = {"uri": "s3://b/a/adapter", "manifestSha256": "a" * 64, "method": "LoRA",
                "baseModelUri": "builtin://smollm2-135m-instruct", "metrics": metrics}
    return _run(body, jobs, pods, artifact=artifact)


@pytest.mark.parametrize("metrics,gate,ok,reason", [
    ({"normalizedMatch": 0.95, "evalLoss": 0.1}, {"minScore": 0.8}, True, "WithinGate"),
    ({"normalizedMatch": 0.50}, {"minScore": 0.8}, False, "ScoreBelowGate"),
    ({"normalizedMatch": 0.95, "exactMatch": 0.7}, {"minScore": 0.8,
                                                   "scoreMetric": "exactMatch"},
     False, "ScoreBelowGate"),
    ({"normalizedMatch": 0.95, "evalLoss": 2.0}, {"minScore": 0.8, "maxEvalLoss": 1.0},
     False, "EvalLossAboveGate"),
    ({"evalLoss": 0.5}, {"minScore": 0.8}, False, "NoScore"),
])
def test_evaluation_gate_on_the_task_score(metrics, gate, ok, reason):
    plan = _succeeded(metrics, gate)
    assert plan.status["phase"] == "Succeeded"
    assert plan.status["metrics"] == metrics
    assert "metrics" not in plan.status["artifact"]
    passed = _cond(plan, "EvalPassed")
    assert (passed["status"] == "True") is ok and passed["reason"] == reason
    if "minScore" in gate and reason != "NoScore":
        assert f"minScore {gate['minScore']}" in passed["message"]


def test_gate_needs_a_bound_and_scoring():
    body = _body(evaluationGate={"scoreMetric": "exactMatch"})
    with pytest.raises(SpecError, match="spec.evaluationGate"):
        parse(body)
    body = _body(evaluation={"score": False})
    with pytest.raises(SpecError, match="spec.evaluationGate.minScore"):
        parse(body)


def test_learning_rate_defaults_by_method_and_the_job_wins():
    obj = yaml.safe_load((ROOT / "examples/finetunejob-ia3.yaml").read_text())
    obj["spec"]["training"].pop("learningRate", None)
    cfg = from_finetunejob(parse(obj))
    assert cfg.training.learning_rate is None
    assert cfg.learning_rate == DEFAULT_LEARNING_RATES["IA3"]
    obj["spec"]["training"]["learningRate"] = 0.003
    assert from_finetunejob(parse(obj)).learning_rate == 0.003


def test_compare_plan_covers_every_method_with_its_own_settings(tmp_path):
    job = parse(yaml.safe_load((ROOT / "examples/finetunejob-lora.yaml").read_text()))
    specs = compare.plan(job, list(compare.METHODS), None, 5, 16, tmp_path)
    by = {s["name"]: s["config"] for s in specs}
    assert list(by) == list(compare.METHODS)
    assert by["DoRA"]["method"]["lora"]["useDora"] is True
    assert by["LoRA"]["method"]["lora"]["useDora"] is False
    assert by["LoRA"]["method"]["lora"]["r"] == 16  # the job's own LoRA settings
    assert by["QLoRA"]["method"]["type"] == "QLoRA"
    assert by["IA3"]["method"] == {"type": "IA3"}
    assert by["LoRA"]["training"]["learningRate"] == 0.0005  # the job's, for its method
    assert by["IA3"]["training"]["learningRate"] == DEFAULT_LEARNING_RATES["IA3"]
    assert by["Full"]["training"]["learningRate"] == DEFAULT_LEARNING_RATES["Full"]
    assert "learningRate" not in by["Base"]["training"]
    assert by["PrefixTuning"]["training"]["gradientCheckpointing"] is False
    assert all(c["training"]["maxSteps"] == 5 and c["evaluation"]["maxSamples"] == 16
               for c in by.values())
    outputs = {c["output"]["uri"] for c in by.values()}
    assert len(outputs) == len(by) and all(u.startswith(f"file://{tmp_path}") for u in outputs)
    one = compare.plan(job, ["IA3"], 0.02, None, None, tmp_path)
    assert one[0]["config"]["training"]["learningRate"] == 0.02


def test_compare_refuses_a_job_without_eval_data(tmp_path):
    obj = yaml.safe_load((ROOT / "examples/finetunejob-lora.yaml").read_text())
    obj = copy.deepcopy(obj)
    obj["spec"]["dataset"].pop("eval")
    obj["spec"].pop("evaluationGate")
    with pytest.raises(compare.CompareError, match="no evaluation data"):
        compare.plan(parse(obj), ["LoRA"], None, None, None, tmp_path)


def test_comparison_table_has_every_column_and_ratio_to_full():
    rows = [{"method": "Full", "trainable_params": 100, "trainable_percent": 100.0,
             "peak_memory_bytes": 3 * 2**30, "imports_rss_bytes": 2**30,
             "tokens_per_second": 50.0, "wall_seconds": 100.0, "eval_loss": 0.1,
             "score": 0.8, "exact_match": 0.8, "artifact_bytes": 2**29, "learning_rate": 5e-5},
            {"method": "LoRA", "trainable_params": 1, "trainable_percent": 1.0,
             "peak_memory_bytes": 2**31, "imports_rss_bytes": 2**30, "tokens_per_second": 80.0,
             "wall_seconds": 60.0, "eval_loss": 0.2, "score": 0.76, "exact_match": 0.7,
             "artifact_bytes": 2**20 * 7, "learning_rate": 5e-4},
            {"method": "IA3", "error": "RuntimeError: boom"}]
    text = compare.table(rows).splitlines()
    header = [c.strip() for c in text[0].strip("|").split("|")]
    assert header[:4] == ["method", "trainable params", "%", "peak memory"]
    assert "score" in header and "vs full" in header and "artifact" in header
    lora = [c.strip() for c in text[3].strip("|").split("|")]
    assert lora[0] == "LoRA" and lora[header.index("vs full")] == "95 %"
    assert lora[header.index("above imports")] == "1,024 MiB"
    assert lora[header.index("artifact")] == "7 MiB"
    assert "failed: RuntimeError: boom" in text[4]
    assert all(line.count("|") == text[0].count("|") for line in text)
