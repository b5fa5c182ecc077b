"""Types shared by both kinds: URIs, references, conditions, Kubernetes scheduling fragments."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Optional

from pydantic import Field

from .base import KubeModel

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

_BUCKET = r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]"
S3_URI = rf"s3://{_BUCKET}(/\S*)?"
FILE_URI = r"file:///\S*"
HF_URI = r"hf://[A-Za-z0-9][A-Za-z0-9._\-]*/[A-Za-z0-9][A-Za-z0-9._\-]*(@\S+)?"
BUILTIN_URI = r"builtin://[a-z0-9][a-z0-9\-]*"

ModelUri = Annotated[str, Field(pattern=f"^({S3_URI}|{FILE_URI}|{HF_URI}|{BUILTIN_URI})$",
                                max_length=1024)]
DataUri = ModelUri
OutputUri = Annotated[str, Field(pattern=f"^({S3_URI}|{FILE_URI})$", max_length=1024)]
Sha256 = Annotated[str, Field(pattern=r"^[a-f0-9]{64}$")]
DnsLabel = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]
DnsName = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253)]
ShortText = Annotated[str, Field(max_length=253)]
_QUANTITY = (r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?"
             r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
Quantity = Annotated[Annotated[int, Field(ge=0)] | Annotated[str, Field(pattern=_QUANTITY)],
                     Field(json_schema_extra={"x-kubernetes-int-or-string": True})]
"""A Kubernetes resource quantity: 2, "500m", "16Gi"."""
IntOrPercent = Annotated[Annotated[int, Field(ge=0)] | Annotated[str, Field(pattern=r"^[0-9]+%$")],
                         Field(json_schema_extra={"x-kubernetes-int-or-string": True})]
"""A count or a percentage: 1, "25%"."""
LabelMap = Annotated[dict[str, Annotated[str, Field(max_length=63)]], Field(max_length=32)]


class SecretRef(KubeModel):
    """A Secret in the object's namespace."""

    name: DnsName
    """Name of the Secret."""


class LocalObjectRef(KubeModel):
    name: DnsName
    """Name of the object, in the same namespace."""


class Toleration(KubeModel):
    """A pod toleration (core/v1 Toleration)."""

    key: Optional[Annotated[str, Field(max_length=253)]] = None
    """Taint key; empty with operator Exists tolerates everything."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Equal matches value; Exists matches any value."""
    value: Optional[Annotated[str, Field(max_length=63)]] = None
    """Taint value to match with operator Equal."""
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = None
    """Taint effect to match; empty matches all effects."""
    toleration_seconds: Optional[int] = None
    """For NoExecute: how long the pod stays bound after the taint appears."""


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(KubeModel):
    """A status condition, following the Kubernetes API conventions."""

    type: Annotated[str, Field(pattern=r"^[A-Z][A-Za-z0-9]*$", max_length=316)]
    """Condition type in PascalCase, e.g. Ready."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: Annotated[str, Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
                                 max_length=1024)] = "Unknown"
    """CamelCase reason for the last transition."""
    message: Annotated[str, Field(max_length=32768)] = ""
    """Human-readable details."""
    last_transition_time: Optional[datetime] = None
    """When status last changed."""
    observed_generation: Optional[Annotated[int, Field(ge=0)]] = None
    """The metadata.generation this condition was computed from."""


Conditions = Annotated[list[Condition], Field(max_length=16, json_schema_extra={
    "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})]

Affinity = Annotated[dict[str, Any], Field(json_schema_extra={
    "x-kubernetes-preserve-unknown-fields": True})]
