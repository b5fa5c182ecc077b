"""Merge an adapter into its base model and publish the merged model (safetensors shards).

The base is always loaded in original precision (``merge.dtype``), never 4-bit: a QLoRA adapter
is merged into the dequantized/original weights, because merging into NF4 weights loses
accuracy. The merge is verified by comparing the logits of the merged model with those of base +
adapter on fixed inputs before anything is uploaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from kubetune.api.finetunejob import MERGEABLE_METHODS
from kubetune.trainerconfig import TrainerConfig

MERGE_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


class MergeError(RuntimeError):
    """The adapter cannot be merged (method) or the merge did not verify."""


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _probe_inputs(tokenizer):
    import torch

    texts = ["What color is the apple?", "Tell me the color of the sky.", "Hello there"]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    width = max(len(i) for i in ids)
    pad = tokenizer.pad_token_id or 0
    return torch.tensor([i + [pad] * (width - len(i)) for i in ids]), \
        torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])


def merge(base_path: Path, adapter_dir: Path, method: str, dtype: str = "float32",
          trust_remote_code: bool = False):
    """Return (merged model, tokenizer, max |logit difference|) vs base + adapter."""
    import torch
    from transformers import AutoTokenizer

    from .loading import load

    if method not in MERGEABLE_METHODS:
        raise MergeError(f"{method} adapters cannot be merged into the base model (only LoRA, "
                         f"QLoRA and IA3 can; serve {method} adapters with kubetune serve)")
    tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    model = load(base_path, adapter_dir, dtype=_dtype(dtype),
                 trust_remote_code=trust_remote_code)  # never 4-bit: see the module's note
    ids, mask = _probe_inputs(tokenizer)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits.float()
        merged = model.merge_and_unload()
        got = merged(input_ids=ids, attention_mask=mask).logits.float()
    diff = float((reference - got).abs().max())
    return merged, tokenizer, diff


def _merge_checked(base_path: Path, adapter_dir: Path, method: str, dtype: str, out: Path,
                   trust_remote_code: bool = False) -> tuple[Path, float, float]:
    """Merge, refuse a merge whose logits drift beyond the dtype's tolerance, save shards."""
    merged, tokenizer, diff = merge(base_path, adapter_dir, method, dtype, trust_remote_code)
    tolerance = MERGE_TOLERANCE[dtype]
    if diff > tolerance:
        raise MergeError(f"merged logits differ from base + adapter by {diff:.2e} "
                         f"(> {tolerance:.0e} for {dtype})")
    merged.save_pretrained(str(out), safe_serialization=True, max_shard_size="1MB")
    tokenizer.save_pretrained(str(out))
    return out, diff, tolerance


def merge_and_publish(cfg: TrainerConfig, base_path: Path, adapter_dir: Path, storage,
                      work: Path) -> dict:
    from kubetune import artifacts

    dtype = cfg.merge.dtype if cfg.merge else "float32"
    out, diff, tolerance = _merge_checked(base_path, adapter_dir, cfg.method.type, dtype,
                                          work / "merged", cfg.model.trust_remote_code)
    uri = cfg.merge.uri if cfg.merge and cfg.merge.uri else cfg.output.merged_uri
    manifest = artifacts.build_manifest(
        out, kind="merged-model", method={"type": cfg.method.type},
        base_model={"uri": cfg.model.uri, "revision": cfg.model.revision}, dataset=None,
        metrics={"maxLogitDiff": diff, "tolerance": tolerance, "dtype": dtype})
    sha = artifacts.upload(out, manifest, uri, storage)
    return {"uri": uri, "manifestSha256": sha, "maxLogitDiff": diff,
            "shards": len(list(out.glob("*.safetensors")))}


def main_merge(base_path: Path, adapter_dir: Path, out: Path, dtype: str) -> dict:
    """`python -m kubetune_trainer merge`: local folders in, merged folder out."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    method = {"LORA": "LoRA", "IA3": "IA3", "PREFIX_TUNING": "PrefixTuning",
              "BOTTLENECK": "Adapter"}.get(config.get("peft_type"), config.get("peft_type"))
    merged, tokenizer, diff = merge(base_path, adapter_dir, method, dtype)
    merged.save_pretrained(str(out), safe_serialization=True, max_shard_size="1MB")
    tokenizer.save_pretrained(str(out))
    return {"out": str(out), "maxLogitDiff": diff}


def publish_merged(base_uri: str, revision: str | None, adapter_uri: str, out_uri: str,
                   dtype: str, work: Path, adapter_sha256: str | None = None) -> dict:
    """`python -m kubetune_trainer merge --adapter-uri`: the merge Job of a LoRAAdapter in
    merged mode. Verifies the adapter against its manifest, merges into the original-precision
    base, checks the logits, uploads the merged model with a manifest naming the adapter."""
    from kubetune import artifacts
    from .sources import resolve_model
    from kubetune.storage import Storage

    storage = Storage()
    adapter_dir = work / "adapter"
    manifest, digest = artifacts.verify(adapter_uri, storage, adapter_dir,
                                        expected_sha256=adapter_sha256)
    base_path = resolve_model(base_uri, revision, work / "cache", storage)
    method = artifacts.described(manifest)["method"]
    if not method:
        raise MergeError(f"{adapter_uri}: the manifest names no method type")
    out, diff, tolerance = _merge_checked(base_path, adapter_dir, method, dtype, work / "merged")
    merged_manifest = artifacts.build_manifest(
        out, kind="merged-model", method={"type": method},
        base_model={"uri": base_uri, "revision": revision}, dataset=None,
        metrics={"maxLogitDiff": diff, "tolerance": tolerance, "dtype": dtype},
        extra={"adapterUri": adapter_uri, "adapterSha256": digest})
    sha = artifacts.upload(out, merged_manifest, out_uri, storage)
    return {"uri": out_uri, "manifestSha256": sha, "maxLogitDiff": diff}
