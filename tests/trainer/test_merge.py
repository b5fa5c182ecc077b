"""Merge: merged vs base + adapter logits agree; QLoRA merges through the original-precision
base; prefix tuning and bottleneck adapters are refused with a clear error."""

import json
import subprocess
import sys

import pytest

from trainerutil import summary
from kubetune import artifacts
from kubetune_trainer import merge, sources, train
from kubetune.storage import Storage

pytestmark = pytest.mark.trainer

MERGE_TOLERANCE = 1e-4  # float32 merge, max |logit difference| on the probe batch


@pytest.mark.parametrize("method", [
    {"type": "LoRA", "lora": {"r": 8, "useDora": True}},
    {"type": "QLoRA", "lora": {"r": 8}, "quantization": {"computeDtype": "float32"}},
    {"type": "IA3"},
], ids=["dora", "qlora", "ia3"])
def test_training_with_merge_publishes_a_verified_merged_model(make_config, tmp_path, method):
    cfg = make_config(method, merge={"enabled": True, "dtype": "float32"},
                      name=f"merge-{method['type'].lower()}")
    assert train.run(cfg) == 0, summary(cfg)
    merged = summary(cfg)["merged"]
    assert merged["maxLogitDiff"] <= MERGE_TOLERANCE
    manifest, _ = artifacts.verify(merged["uri"], Storage(), tmp_path / "merged")
    assert manifest["kind"] == "merged-model"
    assert any(name.endswith(".safetensors") for name in manifest["files"])

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    names = {type(m).__name__ for m in model.modules()}
    assert not names & {"Linear4bit", "Linear8bitLt", "LoraLayer", "Linear"} - {"Linear"}
    assert not any("lora" in n for n, _ in model.named_parameters())  # a plain model again


def test_qlora_merges_into_original_precision_base(make_config, tmp_path):
    cfg = make_config({"type": "QLoRA", "lora": {"r": 8},
                       "quantization": {"computeDtype": "float32"}}, name="qlora-merge-base")
    assert train.run(cfg) == 0, summary(cfg)
    adapter = tmp_path / "adapter"
    artifacts.verify(cfg.output.adapter_uri, Storage(), adapter)
    base = sources.resolve_model("builtin://tiny-llama", "v1", tmp_path / "c", Storage())
    merged, _, diff = merge.merge(base, adapter, "QLoRA", "float32")
    assert diff <= MERGE_TOLERANCE
    import torch

    weight = merged.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == torch.float32  # not NF4-packed uint8


@pytest.mark.parametrize("method", ["PrefixTuning", "Adapter"])
def test_merge_of_unmergeable_method_is_refused(tmp_path, method):
    with pytest.raises(merge.MergeError, match=f"{method} adapters cannot be merged"):
        merge.merge(tmp_path, tmp_path, method)


def test_merge_cli_refuses_prefix_adapter_with_one_line(make_config, tmp_path):
    cfg = make_config({"type": "PrefixTuning", "prefix": {"numVirtualTokens": 4}},
                      training={"maxSteps": 4}, name="prefix-merge")
    assert train.run(cfg) == 0, summary(cfg)
    adapter = tmp_path / "adapter"
    artifacts.verify(cfg.output.adapter_uri, Storage(), adapter)
    base = sources.resolve_model("builtin://tiny-llama", "v1", tmp_path / "c", Storage())
    proc = subprocess.run([sys.executable, "-m", "kubetune_trainer", "merge", "--base", str(base),
                           "--adapter", str(adapter), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kubetune-trainer:")]
    assert lines == ["kubetune-trainer: error: PrefixTuning adapters cannot be merged into the "
                     "base model (only LoRA, QLoRA and IA3 can; serve PrefixTuning adapters "
                     "with kubetune serve)"]
    assert not (tmp_path / "out").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == \
        "PREFIX_TUNING"
