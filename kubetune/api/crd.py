"""Render the CRDs from the pydantic models (the one source of truth).

`python -m kubetune.api.generate` writes `crds/*.yaml` and `docs/api.md`; a test fails when the
checked-in files differ from what the models render."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from .common import GROUP, VERSION
from .finetunejob import (IMMUTABLE_WHEN_STARTED,
                          FineTuneJobSpec, FineTuneJobStatus)
from .loraadapter import LoRAAdapterSpec, LoRAAdapterStatus
from .runtime import FineTuneRuntimeSpec, FineTuneRuntimeStatus

_KEEP = ("type", "description", "default", "enum", "format", "minimum", "maximum", "minLength",
         "maxLength", "pattern", "minItems", "maxItems", "maxProperties", "minProperties",
         "uniqueItems")


def structural(model: type[BaseModel]) -> dict:
    """A model's JSON schema turned into a Kubernetes structural schema (refs inlined)."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return _convert(schema, schema.get("$defs", {}))


def _convert(node: dict, defs: dict) -> dict:
    node = copy.deepcopy(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[1]]
        merged = {**copy.deepcopy(target), **{k: v for k, v in node.items() if k != "title"}}
        return _convert(merged, defs)
    if node.get("x-kubernetes-int-or-string"):
        out = {"x-kubernetes-int-or-string": True}
        for key in ("description", "default"):
            if key in node and node[key] is not None:
                out[key] = node[key]
        # The string branch's pattern applies to string values only (ints pass).
        patterns = [b["pattern"] for b in node.get("anyOf", []) if "pattern" in b]
        if patterns:
            out["pattern"] = patterns[0]
        return out
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b != {"type": "null"}]
        if len(branches) != 1:
            raise ValueError(f"not structural (anyOf of {branches}); use int-or-string")
        rest = {k: v for k, v in node.items() if k != "title"}
        return _convert({**branches[0], **rest}, defs)
    if "const" in node:
        node["enum"] = [node.pop("const")]

    out: dict[str, Any] = {}
    for key in _KEEP:
        if key in node and node[key] is not None:
            out[key] = node[key]
    if "exclusiveMinimum" in node:
        out["minimum"], out["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if "exclusiveMaximum" in node:
        out["maximum"], out["exclusiveMaximum"] = node["exclusiveMaximum"], True
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            out[key] = value

    kind = node.get("type")
    if kind == "object":
        if "properties" in node:
            out["properties"] = {name: _convert(prop, defs)
                                 for name, prop in node["properties"].items()}
            if node.get("required"):
                out["required"] = list(node["required"])
        elif isinstance(node.get("additionalProperties"), dict):
            out["additionalProperties"] = _convert(node["additionalProperties"], defs)
        elif not out.get("x-kubernetes-preserve-unknown-fields"):
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        out["items"] = _convert(node["items"], defs)
    elif kind is None and not out.get("x-kubernetes-preserve-unknown-fields"):
        raise ValueError(f"schema without a type is not structural: {node}")
    return out


def without_defaults(schema: dict) -> dict:
    """A schema whose objects are stored as written: a runtime template (spec.runtimeRef) can
    only tell a field the user set from one the apiserver defaulted if nothing is defaulted.
    The defaults stay documented (docs/api.md) and are applied when the operator parses."""
    out = {k: v for k, v in schema.items() if k != "default"}
    if "properties" in out:
        out["properties"] = {k: without_defaults(v) for k, v in out["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = without_defaults(out[key])
    return out


def _immutability_rules() -> list[dict]:
    return [{
        "rule": (f"!has(oldSelf.status) || !has(oldSelf.status.startTime) || "
                 f"(has(self.spec.{field}) == has(oldSelf.spec.{field}) && "
                 f"(!has(self.spec.{field}) || self.spec.{field} == oldSelf.spec.{field}))"),
        "message": (f"spec.{field} is immutable once the job has started (status.startTime is "
                    f"set); create a new FineTuneJob to change it"),
        "fieldPath": f".spec.{field}",
        "reason": "FieldValueForbidden",
    } for field in IMMUTABLE_WHEN_STARTED]


def _ready_column() -> dict:
    return {"name": "Ready", "type": "string",
            "jsonPath": '.status.conditions[?(@.type=="Ready")].status'}


KINDS = {
    "FineTuneJob": {
        "plural": "finetunejobs", "singular": "finetunejob", "shortNames": ["ftj"],
        "spec": FineTuneJobSpec, "status": FineTuneJobStatus,
        "rules": _immutability_rules, "stored_as_written": True,
        "columns": [
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            _ready_column(),
            {"name": "Method", "type": "string", "jsonPath": ".spec.method.type"},
            {"name": "Runtime", "type": "string", "jsonPath": ".spec.runtimeRef.name",
             "description": "The runtime template the job uses"},
            {"name": "Progress", "type": "number", "jsonPath": ".status.progress.percent",
             "description": "Training progress in percent"},
            {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step",
             "priority": 1},
            {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss",
             "priority": 1},
            {"name": "Score", "type": "number", "jsonPath": ".status.metrics.normalizedMatch",
             "description": "Task score on the eval split (normalized match, 0..1)"},
            {"name": "Reason", "type": "string", "priority": 1,
             "jsonPath": '.status.conditions[?(@.type=="Ready")].reason'},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    },
    "LoRAAdapter": {
        "plural": "loraadapters", "singular": "loraadapter", "shortNames": ["lora"],
        "spec": LoRAAdapterSpec, "status": LoRAAdapterStatus,
        "rules": lambda: [],
        "columns": [
            {"name": "Serving", "type": "string", "jsonPath": ".spec.servingName"},
            {"name": "Stage", "type": "string", "jsonPath": ".spec.stage"},
            {"name": "Mode", "type": "string", "jsonPath": ".spec.mode"},
            {"name": "Resolved", "type": "string", "jsonPath": ".status.resolvedMode",
             "priority": 1},
            {"name": "Loaded", "type": "string", "jsonPath": ".status.loadedReplicas",
             "description": "Replicas serving the adapter / ready replicas of the target"},
            _ready_column(),
            {"name": "Target", "type": "string", "jsonPath": ".spec.target.deployment",
             "priority": 1},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    },
    "ClusterFineTuneRuntime": {
        "plural": "clusterfinetuneruntimes", "singular": "clusterfinetuneruntime",
        "shortNames": ["cftr"], "scope": "Cluster", "health": False,
        "spec": FineTuneRuntimeSpec, "status": FineTuneRuntimeStatus, "rules": lambda: [],
        "columns": [
            {"name": "Image", "type": "string", "jsonPath": ".spec.resources.image"},
            {"name": "GPUs", "type": "integer", "jsonPath": ".spec.resources.gpusPerNode"},
            {"name": "Overridable", "type": "string", "jsonPath": ".spec.overridable",
             "priority": 1},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    },
}
KINDS["FineTuneRuntime"] = {**KINDS["ClusterFineTuneRuntime"], "plural": "finetuneruntimes",
                            "singular": "finetuneruntime", "shortNames": ["ftr"],
                            "scope": "Namespaced"}


def crd(kind: str, documented: bool = False) -> dict:
    """The CRD of `kind`; `documented` keeps the defaults of a spec stored as written (for
    docs/api.md)."""
    info = KINDS[kind]
    spec = structural(info["spec"])
    if info.get("stored_as_written") and not documented:
        spec = without_defaults(spec)
    root: dict[str, Any] = {
        "type": "object",
        "description": (info["spec"].__doc__ or "").strip(),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            # Until the operator has looked, status says "generation 0 observed": kstatus
            # (Flux's `wait`, cli-utils) would read an object without a status as Current
            # (done), and Argo CD's check reads it as Progressing either way.
            "status": {**structural(info["status"]), "default": {"observedGeneration": 0}},
        },
    }
    rules = info["rules"]()
    if rules:
        root["x-kubernetes-validations"] = rules
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{info['plural']}.{GROUP}",
                     "labels": {"app.kubernetes.io/part-of": "kubetune"}},
        "spec": {
            "group": GROUP,
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": info["plural"],
                      "singular": info["singular"], "shortNames": info["shortNames"],
                      "categories": ["kubetune"]},
            "scope": info.get("scope", "Namespaced"),
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": info["columns"],
                "schema": {"openAPIV3Schema": root},
            }],
        },
    }
