"""Load a base model plus an adapter of any method we train, for inference and verification.

Also computes the probe: the logits of a fixed prompt, recorded in the manifest at training time
so that anyone who reloads the artifact can check they get the model that was trained."""

from __future__ import annotations

import json
from pathlib import Path

PROBE_TEXT = "What color is the apple?"
PROBE_VALUES = 16


def adapter_method(adapter_dir: Path) -> str:
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return {"LORA": "LoRA", "IA3": "IA3", "PREFIX_TUNING": "PrefixTuning",
            "BOTTLENECK": "Adapter"}.get(config.get("peft_type"), str(config.get("peft_type")))


def attach(base, adapter_dir: Path, adapter_name: str = "default"):
    """Wrap a loaded base model with the adapter in `adapter_dir`."""
    from . import bottleneck

    if bottleneck.is_bottleneck(adapter_dir):
        return bottleneck.load(base, adapter_dir)
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=adapter_name)


def load(base_path: Path, adapter_dir: Path, quantization: dict | None = None):
    """Base (4-bit again when the adapter was trained on a quantized base) + adapter, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .methods import cpu_has_bf16

    kwargs: dict = {"dtype": torch.float32}
    if quantization:
        bits = quantization.get("bits", 4)
        kwargs = {"device_map": {"": "cpu"}, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=bits == 4, load_in_8bit=bits == 8,
            bnb_4bit_quant_type=quantization.get("quantType", "nf4"),
            bnb_4bit_use_double_quant=quantization.get("doubleQuant", True),
            bnb_4bit_compute_dtype=torch.bfloat16
            if quantization.get("computeDtype", "bfloat16") == "bfloat16" and cpu_has_bf16()
            else torch.float32)}
    base = AutoModelForCausalLM.from_pretrained(str(base_path), **kwargs)
    model = attach(base, adapter_dir)
    model.eval()
    return model


def probe(model, tokenizer) -> dict:
    """Logits of the last position for a fixed prompt (first values and the sum)."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer(PROBE_TEXT, return_tensors="pt").to(device)
    with torch.no_grad():
        logits = model(**ids).logits[0, -1].float().cpu()
    if was_training:
        model.train()
    return {"text": PROBE_TEXT, "lastTokenLogits": [round(float(v), 6)
                                                    for v in logits[:PROBE_VALUES]],
            "logitsSum": round(float(logits.sum()), 4)}


def probe_difference(a: dict, b: dict) -> float:
    return max(abs(x - y) for x, y in zip(a["lastTokenLogits"], b["lastTokenLogits"]))
