"""Load a base model plus an adapter of any method we train: the one path for inference
(`kubetune serve`), merging, verification and reloads (training loads in methods.py, where the
method is set up).

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


def load_base(base_path: Path, quantization: dict | None = None, dtype=None,
              trust_remote_code: bool = False):
    """The base model for inference (serving, verification, reloads): float32 on a CPU (the
    precision the trainer computes in there, and bfloat16 is emulated on most CPUs), 4-bit
    again when `quantization` (the manifest's QLoRA settings) asks for it. Eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .methods import cpu_has_bf16

    kwargs: dict = {"dtype": dtype or torch.float32, "trust_remote_code": trust_remote_code}
    if quantization:
        bits = quantization.get("bits", 4)
        kwargs = {"device_map": {"": "cpu"}, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=bits == 4, load_in_8bit=bits == 8,
            bnb_4bit_quant_type=quantization.get("quantType", "nf4"),
            bnb_4bit_use_double_quant=quantization.get("doubleQuant", True),
            bnb_4bit_compute_dtype=torch.bfloat16
            if quantization.get("computeDtype", "bfloat16") == "bfloat16" and cpu_has_bf16()
            else torch.float32), "trust_remote_code": trust_remote_code}
    base = AutoModelForCausalLM.from_pretrained(str(base_path), **kwargs)
    base.eval()
    return base


def load(base_path: Path, adapter_dir: Path, quantization: dict | None = None, dtype=None,
         trust_remote_code: bool = False):
    """Base (4-bit again when `quantization` says the adapter was trained on a quantized base)
    + adapter, eval mode."""
    model = attach(load_base(base_path, quantization, dtype, trust_remote_code), adapter_dir)
    model.eval()
    return model


def probe(model, tokenizer) -> dict:
    """Logits of the last position for a fixed prompt (first values and the sum), and the
    next token's top-k log-probs with the adapter and without it (kubetune.behaviour: what a
    serving replica must reproduce)."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer(PROBE_TEXT, return_tensors="pt").to(device)
    with torch.no_grad():
        logits = model(**ids).logits[0, -1].float().cpu()
        base = None
        if hasattr(model, "disable_adapter"):  # PEFT: the same weights, adapter off
            with model.disable_adapter():
                base = model(**ids).logits[0, -1].float().cpu()
    if was_training:
        model.train()
    out = {"text": PROBE_TEXT, "lastTokenLogits": [round(float(v), 6)
                                                   for v in logits[:PROBE_VALUES]],
           "logitsSum": round(float(logits.sum()), 4),
           "topLogprobs": _top(logits, tokenizer)}
    if base is not None:
        out["baseTopLogprobs"] = _top(base, tokenizer)
    return out


def _top(logits, tokenizer) -> list[dict]:
    import torch

    from kubetune.behaviour import PROBE_TOP

    values, ids = torch.log_softmax(logits, dim=-1).topk(PROBE_TOP)
    return [{"id": int(i), "token": tokenizer.decode([int(i)]), "logprob": round(float(v), 5)}
            for v, i in zip(values, ids)]


def probe_difference(a: dict, b: dict) -> float:
    return max(abs(x - y) for x, y in zip(a["lastTokenLogits"], b["lastTokenLogits"]))
