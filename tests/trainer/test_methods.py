"""Every PEFT method trains the tiny model for real, publishes a verified artifact to S3, and
the artifact reloads to the logits the trained model had (recorded as the manifest's probe)."""

import json

import pytest
from safetensors.torch import load_file

from trainerutil import events, summary
from kubetune import artifacts
from kubetune_trainer import loading, sources, train
from kubetune.storage import Storage

pytestmark = pytest.mark.trainer

RELOAD_TOLERANCE = {"QLoRA": 1e-3}  # 4-bit dequantization on reload; everything else 1e-4

METHODS = {
    "lora": {"type": "LoRA", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
    "dora": {"type": "LoRA", "lora": {"r": 8, "alpha": 16, "useDora": True, "useRslora": True,
                                      "targetModules": ["all-linear"]}},
    "qlora": {"type": "QLoRA", "lora": {"r": 8, "alpha": 16},
              "quantization": {"bits": 4, "quantType": "nf4", "doubleQuant": True,
                               "computeDtype": "float32"}},
    "prefix": {"type": "PrefixTuning", "prefix": {"numVirtualTokens": 8}},
    "ia3": {"type": "IA3"},
    "adapter-pfeiffer": {"type": "Adapter", "adapter": {"reductionFactor": 4}},
    "adapter-houlsby": {"type": "Adapter", "adapter": {"reductionFactor": 4,
                                                       "architecture": "houlsby",
                                                       "nonLinearity": "gelu"}},
}


def _trained_changed(method: str, weights: dict) -> None:
    """Parameters whose initial value is known moved away from it."""
    import torch

    if method in ("LoRA", "QLoRA"):
        b = [t for k, t in weights.items() if "lora_B" in k]
        assert b and all(t.abs().max() > 0 for t in b), "lora_B is still zero"
    elif method == "IA3":
        vectors = [t for k, t in weights.items() if "ia3_l" in k]
        assert vectors and all((t - 1).abs().max() > 1e-6 for t in vectors), "ia3 still ones"
    elif method == "Adapter":
        up = [t for k, t in weights.items() if ".up.weight" in k]
        assert up and all(t.abs().max() > 0 for t in up), "adapter up-projection still zero"
    else:
        assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.parametrize("name", METHODS, ids=list(METHODS))
def test_method_trains_publishes_and_reloads(make_config, tmp_path, name):
    method = METHODS[name]
    lr = 0.02 if method["type"] in ("PrefixTuning", "IA3") else 0.005
    cfg = make_config(method, training={"learningRate": lr}, name=name)
    assert train.run(cfg) == 0, summary(cfg)

    result = summary(cfg)
    assert result["status"] == "Succeeded"
    losses = [e["loss"] for e in events(cfg) if e["event"] == "progress" and e.get("loss")]
    assert len(losses) >= 5
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"

    storage = Storage()
    dest = tmp_path / "downloaded"
    manifest, digest = artifacts.verify(cfg.output.adapter_uri, storage, dest)
    assert digest == result["artifact"]["manifestSha256"]
    assert manifest["method"]["type"] == method["type"]
    assert manifest["baseModel"] == {"uri": "builtin://tiny-llama", "revision": "v1"}
    assert set(manifest["files"]) >= {"adapter_config.json"}
    config = json.loads((dest / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "builtin://tiny-llama@v1"

    weights_file = next(dest.glob("*.safetensors"))
    _trained_changed(method["type"], load_file(str(weights_file)))

    from transformers import AutoTokenizer

    base = sources.resolve_model("builtin://tiny-llama", "v1", tmp_path / "cache", storage)
    model = loading.load(base, dest, method.get("quantization") if method["type"] == "QLoRA"
                         else None)
    got = loading.probe(model, AutoTokenizer.from_pretrained(str(base)))
    diff = loading.probe_difference(got, manifest["probe"])
    assert diff <= RELOAD_TOLERANCE.get(method["type"], 1e-4), diff
    assert loading.adapter_method(dest) == {"QLoRA": "LoRA"}.get(method["type"], method["type"])
