"""The API models are the one source of truth: CRDs and docs are rendered from them."""

from pathlib import Path

import pytest
import yaml

from kubetune.api import FineTuneJob, LoRAAdapter
from kubetune.api.crd import KINDS, crd
from kubetune.api.generate import all_files
from kubetune.api.validation import SpecError, parse

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("rel", sorted(all_files()))
def test_checked_in_file_matches_models(rel):
    expected = all_files()[rel]
    path = ROOT / rel
    assert path.exists(), f"{rel} missing: run python -m kubetune.api.generate"
    assert path.read_text() == expected, (
        f"{rel} drifted from kubetune/api: run python -m kubetune.api.generate")


def _walk(node, path="root"):
    yield path, node
    for name, prop in (node.get("properties") or {}).items():
        yield from _walk(prop, f"{path}.{name}")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_schema_is_structural_and_bounded(kind):
    schema = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "type" in node or node.get("x-kubernetes-int-or-string") or \
            node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        assert not {"anyOf", "oneOf", "allOf", "$ref"} & set(node), path
        if node.get("type") == "string" and not path.startswith("root.apiVersion") and \
                not path.startswith("root.kind") and "format" not in node and \
                "enum" not in node:
            assert "maxLength" in node or "pattern" in node, f"{path}: unbounded string"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path}: unbounded list"
    if kind.endswith("Runtime"):
        return  # templates: their status says only what generation was seen
    conditions = schema["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_every_model_field_is_in_the_crd():
    def fields(model, prefix):
        for name, info in model.model_fields.items():
            yield f"{prefix}.{info.alias or name}"

    spec = crd("FineTuneJob")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    from kubetune.api.finetunejob import FineTuneJobSpec, MethodSpec

    for field in fields(FineTuneJobSpec, "spec"):
        assert field.split(".")[1] in spec["spec"]["properties"], field
    for field in fields(MethodSpec, "spec.method"):
        assert field.split(".")[2] in spec["spec"]["properties"]["method"]["properties"], field


def test_examples_parse_with_defaults():
    job = parse(yaml.safe_load((ROOT / "examples/finetunejob-lora.yaml").read_text()))
    assert isinstance(job, FineTuneJob)
    assert job.spec.method.lora.r == 16
    assert job.spec.checkpointing.resume == "Latest"
    assert job.spec.retry_policy.max_retries == 3
    adapter = parse(yaml.safe_load((ROOT / "examples/loraadapter-hotswap.yaml").read_text()))
    assert isinstance(adapter, LoRAAdapter)
    assert adapter.spec.rollout.max_unavailable == "25%"


def test_errors_name_fields_like_the_apiserver():
    obj = yaml.safe_load((ROOT / "examples/finetunejob-lora.yaml").read_text())
    obj["spec"]["resources"] = {"tolerations": [{"effect": "Sometimes"}], "memory": "lots"}
    obj["spec"]["method"]["lora"]["r"] = 0
    with pytest.raises(SpecError) as err:
        parse(obj)
    fields = {line.split(":", 1)[0] for line in err.value.errors}
    assert fields == {"spec.method.lora.r", "spec.resources.tolerations[0].effect",
                      "spec.resources.memory"}


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(SpecError, match="kind: must be one of FineTuneJob, LoRAAdapter"):
        parse({"kind": "Deployment"})


def test_training_defaults_to_one_epoch():
    obj = yaml.safe_load((ROOT / "examples/finetunejob-prefix.yaml").read_text())
    del obj["spec"]["training"]
    assert parse(obj).spec.training.epochs == 1
