"""Bottleneck adapter layers (Houlsby et al. 2019; Pfeiffer et al. 2020), saved like PEFT.

PEFT has no bottleneck adapters and AdapterHub's `adapters` pins an older transformers, so this
is a small module of our own. An adapter is ``h + up(act(down(h)))`` with ``up`` initialised
to zero (training starts at the base model's function). Pfeiffer placement puts one after each
layer's MLP output projection; Houlsby adds one after the attention output projection too.

On disk it looks like a PEFT adapter folder: ``adapter_config.json`` (``peft_type``
``BOTTLENECK``) and ``adapter_model.safetensors`` holding only the adapter weights. Adapters are
non-linear, so they cannot be merged into the base weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

PEFT_TYPE = "BOTTLENECK"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
_TARGETS = {"pfeiffer": ("mlp.down_proj",), "houlsby": ("self_attn.o_proj", "mlp.down_proj")}


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, reduction_factor: int, non_linearity: str):
        super().__init__()
        inner = max(hidden // reduction_factor, 1)
        self.down = nn.Linear(hidden, inner)
        self.act = _ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(inner, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        out = self.up(self.act(self.down(hidden.to(self.down.weight.dtype))))
        return hidden + out.to(dtype)


class WithAdapter(nn.Module):
    """A frozen projection followed by a trainable bottleneck adapter."""

    def __init__(self, base: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.base_layer = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base_layer(x))


def _hidden_size(model) -> int:
    return int(model.config.hidden_size)


def add_adapters(model, reduction_factor: int = 16, non_linearity: str = "relu",
                 architecture: str = "pfeiffer") -> list[str]:
    """Freeze the model and wrap the target projections with adapters; returns wrapped names."""
    for param in model.parameters():
        param.requires_grad_(False)
    hidden = _hidden_size(model)
    suffixes = _TARGETS[architecture]
    wrapped = []
    for name, module in list(model.named_modules()):
        if any(name.endswith(s) for s in suffixes) and isinstance(module, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            adapter = Bottleneck(hidden, reduction_factor, non_linearity).to(
                device=module.weight.device,
                dtype=torch.float32 if module.weight.dtype in (torch.float16, torch.bfloat16)
                else module.weight.dtype)
            setattr(parent, child, WithAdapter(module, adapter))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(f"no modules named like {list(suffixes)} in this model: bottleneck "
                         f"adapters support Llama-style decoders")
    model._kubetune_bottleneck = {"reduction_factor": reduction_factor,
                                  "non_linearity": non_linearity,
                                  "architecture": architecture, "target_modules": wrapped}
    return wrapped


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().cpu().contiguous() for name, param in model.named_parameters()
            if ".adapter." in name}


def is_bottleneck(path: Path) -> bool:
    config = Path(path) / CONFIG_NAME
    return config.exists() and json.loads(config.read_text()).get("peft_type") == PEFT_TYPE


def save(model, directory: Path, base_model_name_or_path: str) -> None:
    from safetensors.torch import save_file

    info = model._kubetune_bottleneck
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM",
              "base_model_name_or_path": base_model_name_or_path,
              "reduction_factor": info["reduction_factor"],
              "non_linearity": info["non_linearity"], "architecture": info["architecture"],
              "target_modules": info["target_modules"], "library": "kubetune"}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(adapter_state_dict(model), str(directory / WEIGHTS_NAME))


def load(model, directory: Path):
    """Add adapters to a base model and load trained weights (strict: every key must match)."""
    from safetensors.torch import load_file

    config = json.loads((Path(directory) / CONFIG_NAME).read_text())
    add_adapters(model, config["reduction_factor"], config["non_linearity"],
                 config["architecture"])
    weights = load_file(str(Path(directory) / WEIGHTS_NAME))
    expected = set(adapter_state_dict(model))
    if set(weights) != expected:
        raise ValueError(f"adapter weights do not match the model: missing "
                         f"{sorted(expected - set(weights))[:3]}, unexpected "
                         f"{sorted(set(weights) - expected)[:3]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return model
