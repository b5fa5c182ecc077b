"""ClusterFineTuneRuntime and FineTuneRuntime (kubetune.io/v1alpha1): what a platform team fixes
once for many FineTuneJobs (image, resources, placement, ServiceAccount, S3, trainer defaults)
and which of those fields a job may still set.

A FineTuneJob names one in `spec.runtimeRef`. The runtime-controlled fields of the job's spec
(`CONTROLLED`) come from the runtime unless the runtime lists them in `overridable`; a job that
sets a field the runtime does not let it set is refused at admission (the policy in
`admission()`), naming the field, and again by the operator. The job's own values win where
they are allowed. The resolved values are recorded in the job's status when it starts: a later
change to the runtime never changes a running job."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional  # noqa: F401 - Literal[CONTROLLED]

from pydantic import Field, create_model

from .base import KubeModel
from .common import SecretRef
from .finetunejob import (AdapterLayersSpec, IA3Spec, LoraSpec, PrefixSpec, QuantizationSpec,
                          ResourcesSpec, RuntimeKind, RuntimeRef, TrainingSpec)

__all__ = ["RuntimeKind", "RuntimeRef", "FineTuneRuntimeSpec", "FineTuneRuntimeStatus",
           "CONTROLLED", "locked_errors", "resolve"]

def _partial(model: type[KubeModel], name: str) -> type[KubeModel]:
    """`model` with every field optional and no defaults or cross-field rules: a runtime
    gives some values, the job (or the model's defaults) the rest."""
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata \
            else info.annotation
        fields[field_name] = (Optional[annotation], Field(default=None,
                                                          description=info.description))
    return create_model(name, __base__=KubeModel, __doc__=model.__doc__, **fields)


RuntimeResources = _partial(ResourcesSpec, "RuntimeResources")
RuntimeTraining = _partial(TrainingSpec, "RuntimeTraining")
RuntimeLora = _partial(LoraSpec, "RuntimeLora")
RuntimeQuantization = _partial(QuantizationSpec, "RuntimeQuantization")
RuntimePrefix = _partial(PrefixSpec, "RuntimePrefix")
RuntimeIA3 = _partial(IA3Spec, "RuntimeIA3")
RuntimeAdapterLayers = _partial(AdapterLayersSpec, "RuntimeAdapterLayers")


class RuntimeMethod(KubeModel):
    """Method settings per type (the job still chooses spec.method.type)."""

    lora: Optional[RuntimeLora] = None
    """LoRA / QLoRA settings."""
    quantization: Optional[RuntimeQuantization] = None
    """QLoRA quantization of the base."""
    prefix: Optional[RuntimePrefix] = None
    """Prefix tuning settings."""
    ia3: Optional[RuntimeIA3] = None
    """IA3 settings."""
    adapter: Optional[RuntimeAdapterLayers] = None
    """Bottleneck adapter settings."""


class RuntimeOutput(KubeModel):
    """Where jobs' results are stored (the job still names spec.output.uri)."""

    endpoint: Optional[Annotated[str, Field(pattern=r"^https?://\S+$", max_length=512)]] = None
    """S3 endpoint URL."""
    region: Optional[Annotated[str, Field(max_length=64)]] = None
    """S3 region."""
    credentials_secret: Optional[SecretRef] = None
    """Secret (in the job's namespace) with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."""


class RuntimeScheduling(KubeModel):
    """Queueing."""

    queue_name: Optional[Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                                              max_length=63)]] = None
    """Kueue LocalQueue of the jobs."""


def _controlled() -> tuple[str, ...]:
    """Every runtime-controlled path of a FineTuneJob's spec, sections and their fields."""
    paths: list[str] = []
    for section, model in (("resources", RuntimeResources), ("training", RuntimeTraining),
                           ("output", RuntimeOutput), ("scheduling", RuntimeScheduling)):
        paths.append(section)  # a section in `overridable` allows all of its fields
        paths += [f"{section}.{info.alias or _camel(name)}"
                  for name, info in model.model_fields.items()]
    paths.append("method")
    for name, info in RuntimeMethod.model_fields.items():
        block = f"method.{name}"
        paths.append(block)
        inner = info.annotation.__args__[0]  # Optional[X] -> X
        paths += [f"{block}.{_camel(field)}" for field in inner.model_fields]
    return tuple(paths)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


CONTROLLED = _controlled()
Overridable = Literal[CONTROLLED]  # type: ignore[valid-type]


class FineTuneRuntimeSpec(KubeModel):
    """Values for every FineTuneJob that names this runtime, and what such a job may change."""

    resources: Optional[RuntimeResources] = None
    """Image, GPUs, nodes, CPU and memory, placement (node selector, tolerations, affinity,
    priority class) and the trainer's ServiceAccount."""
    output: Optional[RuntimeOutput] = None
    """S3 endpoint, region and credentials Secret."""
    scheduling: Optional[RuntimeScheduling] = None
    """The Kueue queue."""
    training: Optional[RuntimeTraining] = None
    """Training hyper-parameters."""
    method: Optional[RuntimeMethod] = None
    """Method settings, per method type."""
    overridable: Annotated[list[Overridable], Field(max_length=128)] = Field(
        default_factory=list, json_schema_extra={"default": []})
    """Runtime-controlled fields a job may set (a section such as "training" allows all of its
    fields); every other runtime-controlled field is locked: a job that sets it is refused."""


class FineTuneRuntimeStatus(KubeModel):
    """The runtime is read by the operator when a job starts; nothing is reported here yet."""

    observed_generation: Optional[Annotated[int, Field(ge=0)]] = None
    """metadata.generation last seen."""


def _get(spec: dict, path: str) -> tuple[bool, Any]:
    node: Any = spec
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return False, None
        node = node[key]
    return True, node


def allowed(path: str, overridable: list[str]) -> bool:
    return any(path == o or path.startswith(o + ".") for o in overridable)


def locked_errors(job_spec: dict, runtime: dict, kind: str) -> list[str]:
    """One "spec.<field>: ..." line per runtime-controlled field the job sets but may not."""
    overridable = list(((runtime.get("spec") or {}).get("overridable")) or [])
    name = (runtime.get("metadata") or {}).get("name")
    errors = []
    for path in _leaves():
        present, _ = _get(job_spec, path)
        if present and not allowed(path, overridable):
            errors.append(f"spec.{path}: locked by {kind} {name} (fields a job may set: "
                          f"{', '.join(overridable) or 'none'})")
    return errors


METHOD_BLOCKS = {"LoRA": ("lora",), "QLoRA": ("lora", "quantization"),
                 "PrefixTuning": ("prefix",), "IA3": ("ia3",), "Adapter": ("adapter",)}


def resolve(job_spec: dict, runtime_spec: dict) -> dict:
    """The job's spec with the runtime's values under it (the job's own win); of the method
    settings only the blocks of the job's method type."""
    values = {k: v for k, v in runtime_spec.items() if k != "overridable"}
    training = job_spec.get("training") or {}
    if "epochs" in training or "maxSteps" in training:  # alternatives: the job chose one
        values["training"] = {k: v for k, v in (values.get("training") or {}).items()
                              if k not in ("epochs", "maxSteps")}
    blocks = METHOD_BLOCKS.get(((job_spec.get("method") or {}).get("type")), ())
    method = {k: v for k, v in (values.pop("method", None) or {}).items() if k in blocks}
    if method:
        values["method"] = method
    return _merge(values, job_spec)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# ---- admission: locked fields, by the apiserver --------------------------------------------
ADMISSION_NAME = "kubetune-runtime-locks"


def _leaves() -> list[str]:
    """The fields checked one by one (sections are prefixes a runtime may allow whole)."""
    return [p for p in CONTROLLED if "." in p and not (p.count(".") == 1 and
                                                       p.startswith("method."))]



def _present(obj: str, path: str) -> str:
    parts = path.split(".")
    return " && ".join(f"has({obj}.spec.{'.'.join(parts[:i + 1])})" for i in range(len(parts)))


def _lock_rule(path: str) -> dict:
    """CEL, with `params` one runtime of the policy's kind: the job names this runtime, sets
    `path`, the runtime does not allow it, and (on update) it changed: refused."""
    prefixes = [".".join(path.split(".")[:i + 1]) for i in range(path.count(".") + 1)]
    allowed_by = " || ".join(f"o == '{p}'" for p in prefixes)
    unchanged = (f"(oldObject != null && {_present('oldObject', path)} && "
                 f"oldObject.spec.{path} == object.spec.{path})")
    return {
        "expression": (f"object.spec.runtimeRef.name != params.metadata.name || "
                       f"!({_present('object', path)}) || "
                       f"params.spec.overridable.exists(o, {allowed_by}) || {unchanged}"),
        "messageExpression": (f"'spec.{path}: locked by ' + params.kind + ' ' + "
                              f"params.metadata.name + ' (fields a job may set: ' + "
                              f"(params.spec.overridable.size() == 0 ? 'none' : "
                              f"params.spec.overridable.join(', ')) + ')'"),
        "reason": "Forbidden",
    }


def admission() -> list[dict]:
    """Two ValidatingAdmissionPolicies (one per runtime kind; each runtime is a param, all of
    them are evaluated and only the one a job names applies) and their bindings."""
    out = []
    for kind, suffix in (("ClusterFineTuneRuntime", "cluster"), ("FineTuneRuntime",
                                                                 "namespaced")):
        name = f"{ADMISSION_NAME}-{suffix}"
        labels = {"app.kubernetes.io/part-of": "kubetune"}
        names_kind = (f"(has(object.spec.runtimeRef.kind) ? object.spec.runtimeRef.kind : "
                      f"'ClusterFineTuneRuntime') == '{kind}'")
        out.append({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "failurePolicy": "Fail",
                "paramKind": {"apiVersion": "kubetune.io/v1alpha1", "kind": kind},
                "matchConstraints": {"resourceRules": [{
                    "apiGroups": ["kubetune.io"], "apiVersions": ["*"],
                    "operations": ["CREATE", "UPDATE"], "resources": ["finetunejobs"]}]},
                "matchConditions": [{"name": "names-a-runtime-of-this-kind",
                                     "expression": f"has(object.spec.runtimeRef) && "
                                                   f"{names_kind}"}],
                "validations": [_lock_rule(p) for p in _leaves()],
            }})
        out.append({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name, "labels": labels},
            "spec": {"policyName": name, "validationActions": ["Deny"],
                     "paramRef": {"selector": {}, "parameterNotFoundAction": "Allow"}}})
    return out


class ClusterFineTuneRuntime(KubeModel):
    """The cluster-scoped kind as a whole, for parsing manifests."""

    api_version: Literal["kubetune.io/v1alpha1"] = "kubetune.io/v1alpha1"
    kind: Literal["ClusterFineTuneRuntime"] = "ClusterFineTuneRuntime"
    metadata: dict = Field(default_factory=dict)
    spec: FineTuneRuntimeSpec
    status: Optional[FineTuneRuntimeStatus] = None


class FineTuneRuntime(KubeModel):
    """The namespaced kind as a whole, for parsing manifests."""

    api_version: Literal["kubetune.io/v1alpha1"] = "kubetune.io/v1alpha1"
    kind: Literal["FineTuneRuntime"] = "FineTuneRuntime"
    metadata: dict = Field(default_factory=dict)
    spec: FineTuneRuntimeSpec
    status: Optional[FineTuneRuntimeStatus] = None
