"""Preference tuning (objective dpo) trains for real on the built-in tiny model and preference
pairs: the adapter raises the chosen-over-rejected log-prob margin on held-out pairs above the
base model's (the reference DPO moves away from), the trainer reports that margin, and the
artifact publishes and reloads to the model that was trained."""

import pytest

from trainerutil import events, summary
from kubetune import artifacts
from kubetune.storage import Storage
from kubetune_trainer import builtin, loading, sources, train

pytestmark = pytest.mark.trainer

PREFS = {"train": {"uri": "builtin://tiny-prefs"}, "eval": {"uri": "builtin://tiny-prefs-eval"},
         "format": "preference"}
DPO = {"objective": "dpo", "dpo": {"beta": 0.5}}


def _completion_logp(model, tokenizer, prompt: list[dict], answer: list[dict]) -> float:
    """log p(answer | prompt): the summed log-probs of the tokens the chat template adds after
    the generation prompt (measured here, independently of TRL's fused head)."""
    import torch

    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    full = tokenizer.apply_chat_template(prompt + answer, tokenize=True)
    head = head["input_ids"] if hasattr(head, "keys") else head
    full = full["input_ids"] if hasattr(full, "keys") else full
    assert full[:len(head)] == head, "the prompt is not a prefix of prompt + answer"
    ids = torch.tensor([full])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logps[len(head) - 1:].sum())


def mean_margin(model, tokenizer, pairs: list[dict]) -> float:
    """Mean log p(chosen|prompt) - log p(rejected|prompt) over `pairs`."""
    model.eval()
    margins = [_completion_logp(model, tokenizer, p["prompt"], p["chosen"])
               - _completion_logp(model, tokenizer, p["prompt"], p["rejected"]) for p in pairs]
    return sum(margins) / len(margins)


def _reload(cfg, tmp_path, result):
    """The published adapter, verified and loaded onto the base model."""
    from transformers import AutoTokenizer

    storage = Storage()
    dest = tmp_path / "downloaded"
    manifest, digest = artifacts.verify(cfg.output.adapter_uri, storage, dest)
    assert digest == result["artifact"]["manifestSha256"]
    base = sources.resolve_model("builtin://tiny-llama", "v1", tmp_path / "cache", storage)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = loading.load(base, dest)
    diff = loading.probe_difference(loading.probe(model, tokenizer), manifest["probe"])
    assert diff <= 1e-4, diff
    return manifest, model, tokenizer


def test_dpo_raises_the_held_out_preference_margin(make_config, tmp_path):
    cfg = make_config({"type": "LoRA", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
                      data=PREFS, training={"maxSteps": 30, "learningRate": 0.02,
                                            "loggingSteps": 5},
                      name="dpo-lora", extra=DPO)
    assert train.run(cfg) == 0, summary(cfg)
    result = summary(cfg)
    metrics = result["metrics"]

    progress = [e for e in events(cfg) if e["event"] == "progress" and e.get("loss")]
    assert progress and all("reward_margin" in e and "reward_accuracy" in e for e in progress)
    assert any(e["event"] == "score" and "preferenceAccuracy" in e for e in events(cfg))

    manifest, model, tokenizer = _reload(cfg, tmp_path, result)
    assert manifest["metrics"]["preferenceMargin"] == metrics["preferenceMargin"]
    held_out = builtin.preference_records("eval")
    train_prompts = {p["prompt"][0]["content"] for p in builtin.preference_records()}
    assert not train_prompts & {p["prompt"][0]["content"] for p in held_out}

    after = mean_margin(model, tokenizer, held_out)
    with model.disable_adapter():
        before = mean_margin(model, tokenizer, held_out)
    print(f"held-out log-prob margin: base {before:.4f} -> DPO adapter {after:.4f}")
    assert after - before > 0.1, (before, after)
    # The trainer's figures are the same quantities, from TRL's eval pass.
    assert metrics["preferenceMargin"] == pytest.approx(after, abs=1e-2)
    assert metrics["basePreferenceMargin"] == pytest.approx(before, abs=1e-2)
    assert 0.5 < metrics["preferenceAccuracy"] <= 1


@pytest.mark.parametrize("method", [
    {"type": "PrefixTuning", "prefix": {"numVirtualTokens": 8}},
    {"type": "Adapter", "adapter": {"reductionFactor": 4}},
], ids=["prefix", "bottleneck"])
def test_dpo_with_other_methods_publishes_a_loadable_adapter(make_config, tmp_path, method):
    """Prefix tuning (TRL drops the virtual-token positions) and bottleneck adapters (no PEFT
    model: reference log-probs precomputed before training) train and publish under DPO."""
    cfg = make_config(method, data=PREFS, training={"maxSteps": 6, "learningRate": 0.02},
                      checkpointing={"everySteps": 3}, name=f"dpo-{method['type']}", extra=DPO)
    assert train.run(cfg) == 0, summary(cfg)
    result = summary(cfg)
    assert result["metrics"]["steps"] == 6
    assert "preferenceAccuracy" in result["metrics"]
    assert [e["step"] for e in events(cfg) if e["event"] == "checkpoint"] == [3]
    manifest, _, _ = _reload(cfg, tmp_path, result)
    assert manifest["method"]["type"] == method["type"]


def test_dpo_on_data_without_pairs_is_invalid_input(make_config):
    """format auto passes admission; the data itself decides, before any model is loaded."""
    cfg = make_config({"type": "LoRA"}, data={"format": "auto"}, name="dpo-chat", extra=DPO)
    assert train.run(cfg) == train.EXIT_INVALID
    result = summary(cfg)
    assert result["reason"] == "InvalidInput"
    assert "objective dpo needs preference records (prompt, chosen, rejected), but the " \
           "dataset is messages" in result["message"]
    assert not [e for e in events(cfg) if e["event"] == "model"]
