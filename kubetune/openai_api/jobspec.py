"""OpenAI's create-job request -> a FineTuneJob manifest (pure).

Mapping decisions (docs/openai-api.md):
- `model` names an entry of the server's model catalog (--model NAME=URI): users never hand the
  operator an arbitrary URI.
- `method.type` supervised -> objective sft, format messages; dpo -> objective dpo, format
  preference, `beta` -> spec.dpo.beta. reinforcement is refused.
- `n_epochs` -> training.epochs; `batch_size` B -> perDeviceBatchSize m (the largest divisor
  of B up to --max-micro-batch) and gradientAccumulationSteps B/m, so the effective batch is
  exactly B per device; `learning_rate_multiplier` x the method's measured default learning
  rate (LoRA 5e-4, a tenth for dpo) -> training.learningRate. "auto" leaves our default.
- the fine-tuned model's name is the LoRAAdapter's serving name, ft-<model>[-<suffix>]-<id>.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from ..trainerconfig import DPO_LEARNING_RATE_SCALE, default_learning_rate
from .config import Settings
from .errors import invalid

LABEL = "kubetune.io/openai-api"
REQUEST_ANNOTATION = "kubetune.io/openai-request"
CANCEL_ANNOTATION = "kubetune.io/openai-cancelled-at"
METHODS = {"supervised": ("sft", "messages"), "dpo": ("dpo", "preference")}
HYPERPARAMETERS = {"supervised": ("n_epochs", "batch_size", "learning_rate_multiplier"),
                   "dpo": ("n_epochs", "batch_size", "learning_rate_multiplier", "beta")}
# name -> (number type, lowest, highest, lowest exclusive); OpenAI's own ranges
RANGES = {"n_epochs": (int, 1, 50, False), "batch_size": (int, 1, 256, False),
          "learning_rate_multiplier": (float, 0.0, 10.0, True), "beta": (float, 0.0, 2.0, True)}
SUFFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
PEFT_METHOD = "LoRA"
REQUEST_FIELDS = {"model", "training_file", "validation_file", "hyperparameters", "method",
                  "suffix", "seed", "metadata", "integrations"}


def method_of(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(method type, its hyper-parameters) from `method`, or from the deprecated top-level
    `hyperparameters` (supervised)."""
    method, top = body.get("method"), body.get("hyperparameters")
    if method is None:
        return "supervised", _object(top or {}, "hyperparameters")
    method = _object(method, "method")
    kind = method.get("type")
    if kind not in METHODS:
        raise invalid(f"method.type {str(kind)[:32]!r} is not supported (supervised, dpo)",
                      "method.type", "unsupported_method")
    if top:
        raise invalid("give hyperparameters inside method, not at the top level",
                      "hyperparameters")
    extra = set(method) - {"type", kind}
    if extra:
        raise invalid(f"method.{sorted(extra)[0]} does not belong to method.type {kind}",
                      f"method.{sorted(extra)[0]}")
    block = _object(method.get(kind) or {}, f"method.{kind}")
    return kind, _object(block.get("hyperparameters") or {}, f"method.{kind}.hyperparameters")


def hyperparameters(kind: str, given: dict[str, Any]) -> dict[str, Any]:
    """The hyper-parameters checked against OpenAI's ranges; absent ones are "auto"."""
    allowed = HYPERPARAMETERS[kind]
    for name in given:
        if name not in allowed:
            raise invalid(f"unknown hyperparameter {str(name)[:64]!r} for method {kind} "
                          f"({', '.join(allowed)})", f"hyperparameters.{str(name)[:64]}")
    return {name: _number(name, given.get(name, "auto")) for name in allowed}


def _number(name: str, value: Any) -> Any:
    if value == "auto":
        return value
    kind, low, high, exclusive = RANGES[name]
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and ok_type and float(value).is_integer():
        value = int(value)
    elif kind is int:
        ok_type = False
    if not ok_type or (value <= low if exclusive else value < low) or value > high:
        bound = f"above {low}" if exclusive else f"from {low}"
        raise invalid(f"hyperparameters.{name} must be \"auto\" or a number {bound} to {high}",
                      f"hyperparameters.{name}")
    return value


def micro_batches(batch_size: int, max_micro: int) -> tuple[int, int]:
    """(perDeviceBatchSize, gradientAccumulationSteps) whose product is exactly batch_size."""
    micro = max(d for d in range(1, min(batch_size, max_micro) + 1) if batch_size % d == 0)
    return micro, batch_size // micro


def training_spec(kind: str, hp: dict[str, Any], seed: Any, max_micro: int) -> dict[str, Any]:
    training: dict[str, Any] = {}
    if hp["n_epochs"] != "auto":
        training["epochs"] = hp["n_epochs"]
    if hp["batch_size"] != "auto":
        micro, accumulation = micro_batches(hp["batch_size"], max_micro)
        training["perDeviceBatchSize"] = micro
        training["gradientAccumulationSteps"] = accumulation
    if hp["learning_rate_multiplier"] != "auto":
        scale = DPO_LEARNING_RATE_SCALE if kind == "dpo" else 1.0
        rate = default_learning_rate(PEFT_METHOD) * scale * hp["learning_rate_multiplier"]
        training["learningRate"] = min(rate, 1.0)
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
            raise invalid("seed must be an integer from 0 to 2147483647", "seed")
        training["seed"] = seed
    return training


def serving_name(model: str, suffix: str | None, job_id: str) -> str:
    """ft-<model>[-<suffix>]-<8 hex of the job id>: OpenAI's ft:<model>:<org>:<suffix>:<id>
    in the characters a serving name allows (no colons), at most 128."""
    tag = job_id.removeprefix("ftjob-")[:8]
    middle = re.sub(r"[^A-Za-z0-9._-]", "-", model)[:60] + (f"-{suffix}" if suffix else "")
    return f"ft-{middle}-{tag}"


def check_request(body: dict[str, Any], settings: Settings) -> None:
    unknown = set(body) - REQUEST_FIELDS
    if unknown:
        name = sorted(unknown)[0][:64]
        raise invalid(f"unknown parameter {name!r}", name, "unknown_parameter")
    if body.get("model") not in settings.models:
        offered = ", ".join(sorted(settings.models)) or "none configured"
        raise invalid(f"model {str(body.get('model'))[:64]!r} is not available (offered: "
                      f"{offered})", "model", "model_not_available")
    if body.get("integrations"):
        raise invalid("integrations are not supported (use spec.tracking through "
                      "--spec-defaults)", "integrations")
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not SUFFIX.match(suffix)):
        raise invalid("suffix: 1-64 letters, digits, - or _", "suffix")
    metadata = body.get("metadata")
    if metadata is not None and not _metadata_ok(metadata):
        raise invalid("metadata: at most 16 string pairs (keys 64, values 512 characters)",
                      "metadata")


def _metadata_ok(metadata: Any) -> bool:
    return isinstance(metadata, dict) and len(metadata) <= 16 and all(
        isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
        for k, v in metadata.items())


def build_job(body: dict[str, Any], job_id: str, files: dict[str, dict[str, Any]],
              settings: Settings) -> dict[str, Any]:
    """The FineTuneJob for a create request. `files` maps training_file (and validation_file)
    to their records (kind, uri, sha256), already looked up in the key's namespace."""
    check_request(body, settings)
    kind, given = method_of(body)
    hp = hyperparameters(kind, given)
    objective, data_format = METHODS[kind]
    dataset = {"train": _source(files, body["training_file"], data_format, "training_file"),
               "format": data_format}
    if body.get("validation_file"):
        dataset["eval"] = _source(files, body["validation_file"], data_format,
                                  "validation_file")
    name = serving_name(body["model"], body.get("suffix"), job_id)
    create_adapter: dict[str, Any] = {"name": "{job}", "servingName": name}
    if settings.serve_deployment:
        create_adapter["target"] = {"deployment": settings.serve_deployment}
    spec: dict[str, Any] = {
        "baseModel": {"uri": settings.models[body["model"]]},
        "dataset": dataset,
        "method": {"type": PEFT_METHOD},
        "objective": objective,
        "training": training_spec(kind, hp, body.get("seed"), settings.max_micro_batch),
        "output": {"uri": f"{settings.storage_uri.rstrip('/')}/jobs/{job_id}",
                   "createAdapter": create_adapter}}
    if kind == "dpo" and hp["beta"] != "auto":
        spec["dpo"] = {"beta": hp["beta"]}
    if settings.runtime:
        spec["runtimeRef"] = {"kind": "ClusterFineTuneRuntime", "name": settings.runtime}
    spec = merged(settings.spec_defaults, spec)
    request = {"model": body["model"], "training_file": body["training_file"],
               "validation_file": body.get("validation_file"), "suffix": body.get("suffix"),
               "seed": body.get("seed"), "method": kind, "hyperparameters": hp,
               "metadata": body.get("metadata"), "fine_tuned_model": name}
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": job_id, "labels": {LABEL: "true"},
                         "annotations": {REQUEST_ANNOTATION: json.dumps(request)}},
            "spec": spec}


def _source(files: dict[str, dict[str, Any]], file_id: str, data_format: str,
            param: str) -> dict[str, Any]:
    record = files[file_id]
    wanted = "chat" if data_format == "messages" else "preference"
    if record["kind"] != wanted:
        method = "supervised" if wanted == "chat" else "dpo"
        raise invalid(f"{param} {file_id} holds {record['kind']} records; method {method} "
                      f"needs {wanted} records", param, "invalid_file_format")
    return {"uri": record["uri"], "sha256": record["sha256"]}


def merged(defaults: dict[str, Any], mapped: dict[str, Any]) -> dict[str, Any]:
    """`mapped` over a deep copy of `defaults` (objects merge, anything else is replaced)."""
    out = copy.deepcopy(defaults)
    for key, value in mapped.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid(f"{param} must be an object", param)
    return value
