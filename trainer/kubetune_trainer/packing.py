"""Packing (``spec.dataset.packing``): which kind, decided by measuring the model we train.

TRL 1.x packs with best-fit decreasing (``packing_strategy="bfd"``, the default): whole
sequences are placed into rows of ``maxLength`` tokens (longer ones are truncated, as without
packing) and, since BFD turns ``padding_free`` on, the collator flattens each batch into one
row with ``position_ids`` that restart at 0 for every sequence (and masks the label at each
restart, so no sequence is trained to predict the next one's first token). Whether packed
sequences can see each other is then up to the attention:

- flash_attention_2/3/4 (and kernels named ``*flash*``) run the varlen kernel over the
  ``cu_seq_lens`` the collator passes, or derive them from ``position_ids``;
- sdpa, eager and flex_attention get a block-diagonal causal mask that transformers 5 builds
  from ``position_ids`` (``masking_utils.find_packed_sequence_indices``), but only when there
  is neither a 2-D attention mask nor a KV cache. Prefix tuning passes its virtual tokens as a
  cache, so there the mask is plain causal and sequences would attend across boundaries;
  so might remote-code models with their own masking.

"wrapped" packing cuts sequences anywhere and lets them attend to each other by design; we
never use it. Rather than trust a table, the trainer measures: it runs two sequences packed
(through TRL's own collator) and each alone, and packs only if the packed logits equal the
separate ones. Otherwise it trains unpacked and says why in a ``check`` warning. The mode used
goes into the run's metrics (summary and manifest).

Eval batches are never BFD-packed (``eval_packing=False``): with padding-free on, they are still
flattened without padding and isolated the same way, but hold the same sequences as an unpacked
run's, so ``evalLoss`` stays comparable between runs with and without packing.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.trainerconfig import TrainerConfig

PACKED = "bfd-padding-free"
OFF = "off"
# Two sequences in ordinary words: any tokenizer encodes them. The first is the longer, so a
# leak into the second (which attends to it when not isolated) is large.
PROBE_TEXTS = ("The quick brown fox jumps over the lazy dog while the old cat sleeps in the "
               "warm afternoon sun by the open window.",
               "Packed rows must keep their sequences apart.")
# Largest |packed - separate| over the largest |logit| that still counts as equal: fp32 agrees
# to ~1e-7 on CPU; 16-bit kernels (varlen against dense) differ by rounding, a leak by tens of %.
TOLERANCE = {"fp32": 1e-4, "16bit": 5e-2}


@dataclass
class Packing:
    """What the trainer does with ``spec.dataset.packing``."""

    requested: bool
    mode: str = OFF
    attention: str | None = None
    isolation_error: float | None = None
    reason: str = ""

    def sft_args(self) -> dict:
        """SFTConfig arguments: BFD (padding-free implied) for the train split only."""
        if self.mode != PACKED:
            return {"packing": False}
        return {"packing": True, "packing_strategy": "bfd", "padding_free": True,
                "eval_packing": False}

    def metrics(self) -> dict:
        """The record for the run's metrics: what was asked, what ran, on which attention."""
        out = {"requested": self.requested, "mode": self.mode}
        if self.attention:
            out["attention"] = self.attention
        if self.isolation_error is not None:
            out["isolationError"] = float(f"{self.isolation_error:.3g}")
        return out


def attention_of(model) -> str:
    """The model's attention implementation (through PEFT wrappers)."""
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "unknown")


def _probe_ids(tokenizer) -> list[list[int]]:
    return [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in PROBE_TEXTS]


def _forward(model, batch: dict):
    import torch

    device = next(model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
              for k, v in batch.items() if k != "labels"}
    # use_cache=False as TRL's compute_loss sets it: a cache turns the packed mask off
    return model(**inputs, use_cache=False).logits[0]


def packed_and_separate(model, sequences: list[list[int]], pad_token_id: int):
    """Logits of `sequences` packed into one row as TRL's padding-free collator builds it, and
    of each run alone (concatenated): equal when the attention isolates packed sequences."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    packed_row = {"input_ids": [t for s in sequences for t in s],
                  "seq_lengths": [len(s) for s in sequences]}
    flat = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)
    padded = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = _forward(model, flat([packed_row]))
            alone = torch.cat([_forward(model, padded([{"input_ids": s}])) for s in sequences])
    finally:
        model.train(was_training)
    return packed, alone


def low_precision(model, logits) -> bool:
    """Whether the model computes in 16 bits (or 8-bit integer matmuls): then packed and
    separate logits differ by rounding, and the fp32 tolerance would be too tight."""
    import torch

    low = (torch.float16, torch.bfloat16)
    if logits.dtype in low or getattr(model, "is_loaded_in_8bit", False):
        return True
    if any(p.dtype in low for p in model.parameters()):
        return True
    quantization = getattr(getattr(model, "config", None), "quantization_config", None)
    compute = quantization.get("bnb_4bit_compute_dtype") if isinstance(quantization, dict) \
        else getattr(quantization, "bnb_4bit_compute_dtype", None)
    return compute in low or compute in ("float16", "bfloat16")


def isolation_error(model, tokenizer) -> tuple[float, bool]:
    """max |packed - separate| / max |logit| on two probe sequences, and whether the model
    computes in low precision (see low_precision)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    packed, alone = packed_and_separate(model, _probe_ids(tokenizer), pad)
    half = low_precision(model, packed)
    packed, alone = packed.float(), alone.float()
    scale = float(alone.abs().max()) or 1.0
    return float((packed - alone).abs().max()) / scale, half


def decide(cfg: TrainerConfig, model, tokenizer) -> tuple[Packing, list[tuple[str, str]]]:
    """The packing to train with, and check findings (severity, message) to report."""
    if not cfg.data.packing:
        return Packing(requested=False), []
    attention = attention_of(model)
    try:
        error, half = isolation_error(model, tokenizer)
    except Exception as exc:  # noqa: BLE001 - a model that cannot take a packed row at all
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return Packing(True, OFF, attention, None, reason), [("warning", _unpacked(
            attention, cfg, f"a packed row fails in the model ({reason})"))]
    tolerance = TOLERANCE["16bit" if half else "fp32"]
    if error <= tolerance:
        return Packing(True, PACKED, attention, error), []
    reason = (f"packed sequences attend to each other (logits differ by {error:.1%} of their "
              f"scale from the sequences run alone)")
    return Packing(True, OFF, attention, error, reason), [("warning",
                                                           _unpacked(attention, cfg, reason))]


def _unpacked(attention: str, cfg: TrainerConfig, why: str) -> str:
    return (f"dataset.packing: not packing with attention {attention} and method "
            f"{cfg.method.type}: {why}; training unpacked (padded batches) instead")
