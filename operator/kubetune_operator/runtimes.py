"""spec.runtimeRef: a FineTuneJob's spec with its runtime template's values under it.

Before the job starts, the runtime is read (a ClusterFineTuneRuntime or a FineTuneRuntime of
the job's namespace); from the first attempt on, the values recorded in `status.runtime` are
used, so that a change to the runtime never changes a running job (its retries included)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from kubetune.api.runtime import locked_errors, resolve as merge


@dataclass
class Resolved:
    body: dict | None = None  # the FineTuneJob with the resolved spec (None: no runtime used)
    errors: list[str] = field(default_factory=list)  # locked fields the job sets
    error: str | None = None  # why the runtime could not be read
    status: dict | None = None  # status.runtime
    trusted: dict | None = None  # values of a ClusterFineTuneRuntime (the admin's own)
    generation: int | None = None  # of the runtime the values came from


def resolve(body: dict, read: Callable[[str, str, str], dict | None]) -> Resolved:
    spec = body.get("spec") or {}
    ref = spec.get("runtimeRef")
    if not isinstance(ref, dict) or not ref.get("name"):
        return Resolved()
    kind, name = ref.get("kind") or "ClusterFineTuneRuntime", ref["name"]
    ns = body["metadata"]["namespace"]
    status = body.get("status") or {}
    recorded = status.get("runtime") or {}
    if status.get("startTime") and recorded.get("kind") == kind and \
            recorded.get("name") == name and isinstance(recorded.get("values"), dict):
        values, generation = recorded["values"], recorded.get("generation")
    else:
        runtime = read(kind, ns, name)
        if runtime is None:
            where = "" if kind == "ClusterFineTuneRuntime" else f" in namespace {ns}"
            return Resolved(error=f"spec.runtimeRef: {kind} {name}{where} not found (or not "
                                  f"readable by the operator); the job starts once it exists")
        values = runtime.get("spec") or {}
        generation = (runtime.get("metadata") or {}).get("generation")
    errors = locked_errors(spec, {"metadata": {"name": name}, "spec": values}, kind)
    resolved = {**body, "spec": merge(spec, values)}
    record = {"kind": kind, "name": name, "generation": generation, "values": values}
    return Resolved(resolved, errors, None, {k: v for k, v in record.items() if v is not None},
                    values if kind == "ClusterFineTuneRuntime" else None, generation)
