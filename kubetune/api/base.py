"""Base for the API models: camelCase, strict, and cross-field rules written once in two forms.

A :class:`Rule` holds a CEL expression (rendered into the CRD as ``x-kubernetes-validations``,
enforced by the apiserver at admission) next to its Python twin (enforced when a spec is parsed
without an apiserver, e.g. by ``kubetune run`` or the operator's defence in depth). The
table-driven admission tests feed the same invalid objects to both, so the two cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel


@dataclass(frozen=True)
class Rule:
    cel: str
    """CEL, evaluated with ``self`` bound to the model's object."""
    message: str
    """Shown on rejection; it names the field."""
    check: Callable[[Any], bool]
    """Python twin: returns True when the object is valid."""
    field_path: str | None = None
    """Where the apiserver reports the error, relative to the model (e.g. ``.quantization``)."""
    reason: str | None = None

    def crd(self) -> dict:
        out = {"rule": self.cel, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason:
            out["reason"] = self.reason
        return out


def _render_rules(schema: dict, cls: type) -> None:
    """Put a model's own rules into the JSON schema it contributes to the CRD."""
    rules = cls.__dict__.get("rules", ())
    if rules:
        schema["x-kubernetes-validations"] = [r.crd() for r in rules]


class KubeModel(BaseModel):
    """A Kubernetes-style object fragment: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              use_attribute_docstrings=True, json_schema_extra=_render_rules)

    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self):
        for rule in type(self).__dict__.get("rules", ()):
            if not rule.check(self):
                raise ValueError(rule.message)
        return self

    def wire(self) -> dict:
        """The object as it appears in Kubernetes (camelCase, unset fields omitted)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
