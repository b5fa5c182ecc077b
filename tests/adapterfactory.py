"""Real adapter artifacts without a training run: the built-in tiny Llama wrapped with a PEFT
method whose weights are randomised (so the adapter visibly changes the output), saved, given a
kubetune manifest and uploaded to S3 — the same files and manifest the trainer publishes."""

from __future__ import annotations

import secrets
from pathlib import Path

CACHE = Path.home() / ".cache" / "kubetune" / "test-cache"
BASE = "builtin://tiny-llama"


def base_path() -> Path:
    from kubetune_trainer import builtin

    return builtin.build_base_model("tiny-llama", CACHE / "builtin" / f"tiny-llama-{builtin.REVISION}")


def make_adapter(directory: Path, method: str = "LoRA", rank: int = 8, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_path()))
    directory.mkdir(parents=True, exist_ok=True)
    if method == "Adapter":
        from kubetune_trainer import bottleneck

        bottleneck.add_adapters(model, reduction_factor=4)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "adapter" in name:
                    param.normal_(0, 0.5)
        bottleneck.save(model, directory, BASE)
        return directory
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, get_peft_model

    config = {"LoRA": lambda: LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                                         target_modules=["q_proj", "v_proj"]),
              "IA3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                       feedforward_modules=["down_proj"]),
              "PrefixTuning": lambda: PrefixTuningConfig(num_virtual_tokens=4,
                                                         task_type="CAUSAL_LM")}[method]()
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.normal_(1.0 if method == "IA3" else 0.0, 0.5 if method != "LoRA" else 0.3)
    peft_model.save_pretrained(str(directory))
    return directory


def probe(directory: Path, base: Path | None = None) -> dict:
    """The manifest's probe of an adapter folder, computed as the trainer does (loading.py)."""
    from transformers import AutoTokenizer

    from kubetune_trainer import loading

    base = base or base_path()
    model = loading.load(base, directory)
    return loading.probe(model, AutoTokenizer.from_pretrained(str(base)))


def publish(storage, uri: str, directory: Path, method: str = "LoRA", rank: int | None = 8,
            base_uri: str = BASE, revision: str | None = "v1",
            probe_of: Path | None = None, base: Path | None = None) -> str:
    """Manifest (with the probe, like the trainer's) + upload; returns the manifest's sha256.
    `probe_of`: record another folder's probe instead (an artifact whose weights do not
    behave as its manifest says). `base`: the base model folder when it is not tiny Llama."""
    from kubetune import artifacts

    manifest = artifacts.build_manifest(
        directory, kind="adapter", method={"type": method, "rank": rank},
        base_model={"uri": base_uri, "revision": revision}, dataset=None, metrics={},
        extra={"probe": probe(probe_of or directory, base)}
        if base_uri == BASE or base is not None else None)
    return artifacts.upload(directory, manifest, uri, storage)


def published(storage, bucket: str, tmp: Path, method: str = "LoRA", rank: int = 8,
              seed: int = 0, **kwargs) -> tuple[str, str]:
    """A fresh artifact in S3: (uri, manifest sha256)."""
    uri = f"s3://{bucket}/adapters/{method.lower()}-{secrets.token_hex(4)}"
    directory = make_adapter(tmp / f"{method}-{secrets.token_hex(3)}", method, rank, seed)
    if kwargs.get("probe_of") == "seed+1":  # the probe of a sibling adapter
        kwargs["probe_of"] = make_adapter(tmp / f"{method}-{secrets.token_hex(3)}", method,
                                          rank, seed + 1)
    return uri, publish(storage, uri, directory, method,
                        rank if method in ("LoRA", "QLoRA") else None, **kwargs)


def make_lora_on(base: Path, directory: Path, rank: int = 64, seed: int = 0) -> Path:
    """A LoRA on every linear layer of the model in `base` (the real model's realistic size:
    r=64 on SmolLM2-135M is ~80 MB), weights randomised so it changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank,
                                                  target_modules="all-linear",
                                                  init_lora_weights=False))
    with torch.no_grad():
        for _, param in peft_model.named_parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.02)
    peft_model.save_pretrained(str(directory))
    return directory
