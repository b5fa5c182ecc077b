"""Load the base model and set up the PEFT method: LoRA (DoRA, rsLoRA), QLoRA, prefix tuning,
IA3, and bottleneck adapters."""

from __future__ import annotations

from pathlib import Path

from kubetune.api.finetunejob import LoraSpec

from kubetune.trainerconfig import TrainerConfig

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
IA3_DEFAULT = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD = ("down_proj",)


class MethodError(ValueError):
    """The method cannot be applied to this model; one line naming the cause."""


def device_for(cfg: TrainerConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def torch_dtype(cfg: TrainerConfig, device: str):
    import torch

    if device == "cpu":
        return torch.float32
    precision = cfg.training.precision
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def quantization_config(cfg: TrainerConfig, device: str):
    import torch
    from transformers import BitsAndBytesConfig

    q = cfg.method.quantization
    bits = q.bits if q else 4
    compute = {"bfloat16": torch.bfloat16, "float16": torch.float16,
               "float32": torch.float32}[q.compute_dtype if q else "bfloat16"]
    if device == "cpu" and compute != torch.float32 and not cpu_has_bf16():
        # fp16 matmuls do not exist on CPU, and bf16 ones are emulated (many times slower)
        # without AVX512-BF16/AMX: compute in fp32 there; the weights stay 4-bit.
        compute = torch.float32
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type if q else "nf4",
                              bnb_4bit_use_double_quant=q.double_quant if q else True,
                              bnb_4bit_compute_dtype=compute)


def load_base(cfg: TrainerConfig, path: Path, device: str, quantize: bool | None = None):
    """The base model, quantized for QLoRA (unless quantize=False, e.g. for merging)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"trust_remote_code": cfg.model.trust_remote_code}
    quantized = cfg.method.type == "QLoRA" if quantize is None else quantize
    if quantized and not (cfg.method.lora and cfg.method.lora.init == "loftq"):
        kwargs["quantization_config"] = quantization_config(cfg, device)
        kwargs["device_map"] = {"": device if device == "cpu" else 0}
        kwargs["dtype"] = kwargs["quantization_config"].bnb_4bit_compute_dtype \
            if getattr(kwargs["quantization_config"], "load_in_4bit", False) else None
    else:
        kwargs["dtype"] = torch_dtype(cfg, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except Exception as exc:  # noqa: BLE001 - one clear line
        raise MethodError(f"cannot load the base model from {cfg.model.uri}: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
    if "quantization_config" not in kwargs and device != "cpu":
        model.to(device)
    return model


def _linear_names(model) -> set[str]:
    from torch import nn

    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and "lm_head" not in name}


def resolve_targets(model, requested, default) -> list[str] | str:
    """Check that target modules match something (the silent LoRA failure) and resolve defaults."""
    names = _linear_names(model)
    if requested == ["all-linear"]:
        return "all-linear"
    wanted = list(requested or [d for d in default if d in names])
    if not wanted:
        raise MethodError(f"no default target modules {list(default)} in this model; set "
                          f"targetModules (linear layers: {', '.join(sorted(names)[:12])})")
    missing = [w for w in wanted if w not in names and not any(
        n.endswith(w) for n, _ in model.named_modules())]
    if missing:
        raise MethodError(f"targetModules {missing} match no module of this model (linear "
                          f"layers: {', '.join(sorted(names)[:12])})")
    return wanted


def peft_config(cfg: TrainerConfig, model):
    from peft import IA3Config, LoftQConfig, LoraConfig, PrefixTuningConfig

    method = cfg.method
    if method.type in ("LoRA", "QLoRA"):
        lora = method.lora or LoraSpec()
        init = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora",
                "loftq": "loftq"}[lora.init]
        extra = {}
        if lora.init == "loftq":
            extra["loftq_config"] = LoftQConfig(loftq_bits=4, loftq_iter=1)
        return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=resolve_targets(model, lora.target_modules, ATTENTION),
                          use_dora=lora.use_dora, use_rslora=lora.use_rslora,
                          init_lora_weights=init, modules_to_save=lora.modules_to_save,
                          task_type="CAUSAL_LM", **extra)
    if method.type == "PrefixTuning":
        prefix = method.prefix
        return PrefixTuningConfig(num_virtual_tokens=prefix.num_virtual_tokens if prefix else 20,
                                  prefix_projection=prefix.projection if prefix else False,
                                  task_type="CAUSAL_LM")
    if method.type == "IA3":
        ia3 = method.ia3
        targets = resolve_targets(model, ia3.target_modules if ia3 else None, IA3_DEFAULT)
        ff = list(ia3.feedforward_modules) if ia3 and ia3.feedforward_modules else \
            [t for t in IA3_FEEDFORWARD if isinstance(targets, list) and t in targets]
        return IA3Config(target_modules=targets, feedforward_modules=ff, task_type="CAUSAL_LM")
    return None  # bottleneck adapters are applied by apply_method


def prepare(cfg: TrainerConfig, model):
    """The model to wrap and the PEFT config to wrap it with; the config is None for bottleneck
    adapters, which are added here (they are no PEFT method). Split from `apply_method` so that
    DPO can hand TRL an unwrapped base plus the config: only then does TRL take the base with
    the adapter disabled as the reference (given a PeftModel it copies the adapter as "ref")."""
    from . import bottleneck

    if cfg.method.type == "Adapter":
        spec = cfg.method.adapter
        try:
            bottleneck.add_adapters(model, spec.reduction_factor if spec else 16,
                                    spec.non_linearity if spec else "relu",
                                    spec.architecture if spec else "pfeiffer")
        except ValueError as exc:
            raise MethodError(str(exc)) from None
        return model, None
    from peft import prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    return model, peft_config(cfg, model)


def apply_method(cfg: TrainerConfig, model):
    """Wrap the base with the method; returns the trainable model (PeftModel or adapted)."""
    from peft import get_peft_model

    model, config = prepare(cfg, model)
    if config is None:
        return model
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise MethodError(f"cannot apply {cfg.method.type}: {str(exc).splitlines()[0]}") from None


def trainable_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
