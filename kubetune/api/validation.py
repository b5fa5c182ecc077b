"""Parse FineTuneJob / LoRAAdapter manifests with the API models, with errors that name fields
the way the apiserver does (``spec.method.lora.r: ...``)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from .finetunejob import FineTuneJob
from .loraadapter import LoRAAdapter
from .runtime import ClusterFineTuneRuntime, FineTuneRuntime

KINDS = {"FineTuneJob": FineTuneJob, "LoRAAdapter": LoRAAdapter,
         "ClusterFineTuneRuntime": ClusterFineTuneRuntime, "FineTuneRuntime": FineTuneRuntime}


class SpecError(ValueError):
    """An invalid manifest; ``errors`` holds one "field: message" line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("; ".join(errors))


def field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part) or part in ("function-after", "function-plain"):
            continue  # union branch labels such as "int" or "constrained-str"
        else:
            out += f".{part}" if out else str(part)
    return out


def _format(exc: ValidationError) -> list[str]:
    lines = []
    seen = set()
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and (
            p in ("int", "str") or p.startswith("constrained-") or "[" in p)))
        msg = err["msg"].removeprefix("Value error, ")
        # Cross-field rule messages already start with the field they are about.
        line = msg if msg.startswith("spec.") or not loc else f"{field_path(loc)}: {msg}"
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return lines


def parse(obj: dict[str, Any]):
    """Validate a manifest dict; returns the model or raises SpecError."""
    kind = obj.get("kind")
    model = KINDS.get(kind)
    if model is None:
        raise SpecError([f"kind: must be one of {', '.join(KINDS)} (got {kind!r})"])
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise SpecError(_format(exc)) from None
