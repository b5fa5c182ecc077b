"""The trainer config: importable without torch, rendered from FineTuneJobs, impossible
combinations rejected before a GPU is touched."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kubetune.api.validation import parse
from kubetune.trainerconfig import TrainerConfig, from_finetunejob

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def _cfg(**changes) -> dict:
    base = {"model": {"uri": "builtin://tiny-llama"},
            "data": {"train": {"uri": "builtin://tiny-chat"}},
            "method": {"type": "LoRA"}, "output": {"uri": "s3://bucket/run"}}
    for key, value in changes.items():
        base[key] = value
    return base


def test_config_module_imports_without_torch_or_kopf():
    code = ("import sys, kubetune.trainerconfig; "
            "bad=[m for m in ('torch','kopf','transformers','peft') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("method,explicit,expected", [
    ("PrefixTuning", None, False), ("QLoRA", None, True), ("LoRA", None, False),
    ("LoRA", True, True), ("QLoRA", False, False),
])
def test_gradient_checkpointing_resolution(method, explicit, expected):
    training = {"epochs": 1, **({"gradientCheckpointing": explicit} if explicit is not None else {})}
    cfg = TrainerConfig.model_validate(_cfg(method={"type": method}, training=training))
    assert cfg.gradient_checkpointing is expected


@pytest.mark.parametrize("changes,message", [
    ({"method": {"type": "PrefixTuning"}, "merge": {"enabled": True}},
     "PrefixTuning adapters cannot be merged"),
    ({"method": {"type": "Adapter"}, "merge": {"enabled": True}},
     "Adapter adapters cannot be merged"),
    ({"method": {"type": "PrefixTuning"}, "training": {"epochs": 1, "gradientCheckpointing": True}},
     "prefix tuning does not work with gradient checkpointing"),
    ({"data": {"train": {"uri": "builtin://tiny-text"}, "format": "text",
               "assistantOnlyLoss": True}}, "needs chat data"),
    ({"method": {"type": "QLoRA", "lora": {"init": "loftq"},
                 "quantization": {"quantType": "fp4"}}}, "loftq"),
    ({"method": {"type": "LoRA", "lora": {"init": "loftq"}}}, "loftq"),
    ({"output": {"uri": "hf://org/model"}}, "output.uri"),
])
def test_impossible_combinations_fail_before_training(changes, message):
    with pytest.raises(ValidationError, match=message):
        TrainerConfig.model_validate(_cfg(**changes))


def test_rendered_from_finetunejob_and_round_trips(tmp_path):
    job = parse(yaml.safe_load((ROOT / "examples/finetunejob-qlora.yaml").read_text()))
    cfg = from_finetunejob(job, namespace="ml", attempt=2, status_sink=True)
    assert cfg.method.quantization.quant_type == "nf4"
    assert cfg.merge is not None and cfg.merge.dtype == "bfloat16"
    assert cfg.logging.status.name == "qlora-1gpu" and cfg.logging.status.attempt == 2
    assert cfg.output.adapter_uri == "s3://kubetune/finetunes/qlora-1gpu/adapter"
    path = tmp_path / "config.yaml"
    path.write_text(cfg.dump())
    again = TrainerConfig.load(path, ["training.maxSteps=7"])
    assert again.training.max_steps == 7
    assert again.method == cfg.method


def test_libyaml_renders_any_chat_template_the_trainer_reads_back_unchanged():
    """The operator renders a config per job with libyaml's emitter (5x the pure-Python one);
    whatever a user's template holds comes back character for character (the two emitters
    may spell an escape differently: \\xE9 or \\xe9)."""
    assert yaml.__with_libyaml__  # PyPI's PyYAML wheels have it; without it dump is slow
    template = ("{% for m in messages %}<|{{ m['role'] }}|>: {{ m['content'] }}\n{% endfor %}"
                "\t- ---\n... 'q' \"dq\" # not a comment: {x: [1, 2]} \u00e9\u4e2d\U0001F600 "
                "\\u0000 " + "long " * 40 + "\n  indented\r\n")
    cfg = TrainerConfig.model_validate(_cfg(data={"train": {"uri": "builtin://tiny-chat"},
                                                  "chatTemplate": template}))
    text = cfg.dump()
    assert yaml.safe_load(text)["data"]["chatTemplate"] == template
    assert TrainerConfig.model_validate(yaml.safe_load(text)) == cfg
