"""LoRAAdapter (kubetune.io/v1alpha1): a trained adapter, verified and rolled into serving."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, Optional

from pydantic import Field

from .base import KubeModel, Rule
from .common import (Conditions, DnsName, IntOrPercent, LabelMap, LocalObjectRef, ModelUri,
                     SecretRef, Sha256)

ServingName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")]
Stage = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]
ServingMode = Literal["Auto", "HotSwap", "Merged"]
Runtime = Literal["vllm", "kubetune"]


class AdapterBaseModel(KubeModel):
    """The base model the adapter was trained on; must equal the artifact manifest's."""

    uri: ModelUri
    """Base model URI."""
    revision: Optional[Annotated[str, Field(max_length=128)]] = None
    """Base model revision."""


class AdapterSource(KubeModel):
    """Where the adapter artifact is (exactly one of uri and fromFineTuneJob)."""

    uri: Optional[Annotated[str, Field(pattern=r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/\S*)?|file:///\S*)$",
                                       max_length=1024)]] = None
    """Prefix holding the adapter files and manifest.json."""
    sha256: Optional[Sha256] = None
    """Expected sha256 of manifest.json; pins the exact artifact."""
    from_fine_tune_job: Optional[LocalObjectRef] = None
    """Take the artifact of this FineTuneJob once it is published."""
    endpoint: Optional[Annotated[str, Field(pattern=r"^https?://\S+$", max_length=512)]] = None
    """S3 endpoint URL (default: the chart's)."""
    credentials_secret: Optional[SecretRef] = None
    """Secret with S3 credentials (default: the chart's)."""

    rules = (
        Rule("has(self.uri) != has(self.fromFineTuneJob)",
             "spec.source: set exactly one of uri or fromFineTuneJob",
             lambda s: (s.uri is None) != (s.from_fine_tune_job is None)),
    )


class LabelSelector(KubeModel):
    match_labels: LabelMap
    """Labels of the serving pods."""


class AdapterTarget(KubeModel):
    """The serving Deployment the adapter goes into."""

    deployment: DnsName
    """Name of the serving Deployment (same namespace)."""
    selector: Optional[LabelSelector] = None
    """Selector of its serving pods; default: the Deployment's own selector."""
    runtime: Runtime = "kubetune"
    """vllm (runtime LoRA API; serves LoRA only) or kubetune (kubetune serve; every method)."""
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    """Port of the OpenAI-compatible API on each pod."""
    sync_port: Annotated[int, Field(ge=1, le=65535)] = 8090
    """runtime vllm: port of the kubetune adapter-sync sidecar that copies the verified
    artifact into the folder vLLM loads from (operator setting vllmAdapterDir)."""
    container: Optional[DnsName] = None
    """Container running the model server (merged mode rewrites its model); default: the first."""
    api_key_secret: Optional[SecretRef] = None
    """Secret with key API_KEY, sent as a bearer token to the engine."""


class CompatibilitySpec(KubeModel):
    """Checks between artifact and target before anything is loaded."""

    enforce: bool = True
    """Refuse to load an incompatible adapter (Compatible=False); false only reports."""
    max_rank: Optional[Annotated[int, Field(ge=1, le=1024)]] = None
    """Largest LoRA rank the server accepts (vLLM --max-lora-rank)."""
    verify_behaviour: bool = True
    """Count a replica only if it answers the manifest's probe like the trained adapter."""
    probe_tolerance: Annotated[float, Field(gt=0, le=5)] = 0.1
    """Largest difference (nats) between a replica's probe log-probs and the manifest's."""


class RolloutSpec(KubeModel):
    """How a merged model is rolled out."""

    max_unavailable: IntOrPercent = "25%"
    """Serving pods that may be unavailable during the rollout."""
    rollback_on_failure: bool = True
    """Roll back to the previous model when the rollout fails."""
    progress_deadline_seconds: Annotated[int, Field(ge=10, le=86400)] = 600
    """How long the rollout may take before it counts as failed."""


class ConditionRequirement(KubeModel):
    """A condition that must be True before the adapter is served."""

    condition_type: Annotated[str, Field(pattern=r"^[A-Z][A-Za-z0-9]*$", max_length=316)]
    """Condition type, e.g. EvalPassed."""
    object: Literal["FineTuneJob", "LoRAAdapter"] = "FineTuneJob"
    """Object that carries it: the source FineTuneJob, or this adapter."""


class PromotionSpec(KubeModel):
    requires: Annotated[list[ConditionRequirement], Field(max_length=16)] = []
    """Conditions that must be True (e.g. an evaluation gate)."""


class LoRAAdapterSpec(KubeModel):
    """A trained adapter and where it is served."""

    base_model: AdapterBaseModel
    """Base model; must match the artifact's manifest and the serving target."""
    source: AdapterSource
    """The artifact."""
    serving_name: ServingName
    """Name clients send in the OpenAI "model" field."""
    alias: Optional[ServingName] = None
    """Versions sharing an alias replace each other on the target (promotion)."""
    stage: Stage = "candidate"
    """candidate, staging, production, or any label."""
    target: Optional[AdapterTarget] = None
    """Serving target; without it the adapter is verified but not served."""
    mode: ServingMode = "Auto"
    """HotSwap into running servers, Merged into a new Deployment revision, or Auto."""
    compatibility: CompatibilitySpec = Field(default_factory=CompatibilitySpec,
                                             json_schema_extra={"default": {}})
    """Compatibility checks."""
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, json_schema_extra={"default": {}})
    """Rollout of merged models."""
    promotion: Optional[PromotionSpec] = None
    """Promotion gates."""

    rules = (
        Rule("self.mode != 'Merged' || has(self.target)",
             "spec.target: mode Merged needs a target Deployment",
             lambda s: s.mode != "Merged" or s.target is not None, field_path=".target"),
    )


class ReplicaCounts(KubeModel):
    desired: Annotated[int, Field(ge=0)] = 0
    """Serving replicas that should have the adapter (the Deployment's replicas, or more ready
    pods while a rollout surges)."""
    loaded: Annotated[int, Field(ge=0)] = 0
    """Replicas confirmed (via /v1/models) to serve it."""
    failed: Annotated[int, Field(ge=0)] = 0
    """Replicas where loading failed."""


class ReplicaFailure(KubeModel):
    pod: DnsName
    """Serving pod."""
    reason: Annotated[str, Field(max_length=128)]
    """CamelCase reason."""
    message: Annotated[str, Field(max_length=4096)] = ""
    """Details."""
    time: Optional[datetime] = None
    """When it happened."""


class VerifiedArtifact(KubeModel):
    uri: Annotated[str, Field(max_length=1024)]
    """Verified artifact prefix."""
    manifest_sha256: Optional[Sha256] = None
    """sha256 of its manifest.json."""
    method: Optional[Annotated[str, Field(max_length=32)]] = None
    """PEFT method."""
    rank: Optional[Annotated[int, Field(ge=0)]] = None
    """LoRA rank, where the method has one."""
    dataset_sha256: Optional[Sha256] = None
    """sha256 of the training data named in the verified manifest (lineage)."""
    tracking_run_id: Optional[Annotated[str, Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]] = None
    """Experiment-tracking (MLflow) run id named in the verified manifest (lineage)."""


class LoRAAdapterStatus(KubeModel):
    """Observed state: verification, resolved mode and per-replica truth."""

    observed_generation: Optional[Annotated[int, Field(ge=0)]] = None
    """metadata.generation this status describes."""
    conditions: Optional[Conditions] = None
    """ArtifactVerified, Compatible, Loaded, RolledOut, Ready, Degraded."""
    resolved_mode: Optional[Literal["HotSwap", "Merged"]] = None
    """The mode Auto resolved to."""
    replicas: Optional[ReplicaCounts] = None
    """Per-replica truth."""
    loaded_replicas: Optional[Annotated[str, Field(max_length=32)]] = None
    """loaded/desired, for kubectl get."""
    failures: Optional[Annotated[list[ReplicaFailure], Field(max_length=10)]] = None
    """The most recent per-replica failures (bounded)."""
    artifact: Optional[VerifiedArtifact] = None
    """The artifact as verified."""
    served_revision: Optional[Annotated[str, Field(max_length=253)]] = None
    """Model revision actually served (Deployment revision in merged mode, manifest digest in hot-swap)."""
    merged_model_uri: Optional[Annotated[str, Field(max_length=1024)]] = None
    """Merged model, in merged mode."""
    served_target: Optional[DnsName] = None
    """Deployment the adapter was last served on (a changed spec.target unloads it there)."""


class LoRAAdapter(KubeModel):
    api_version: Literal["kubetune.io/v1alpha1"] = "kubetune.io/v1alpha1"
    kind: Literal["LoRAAdapter"] = "LoRAAdapter"
    metadata: dict = Field(default_factory=dict)
    spec: LoRAAdapterSpec
    status: Optional[LoRAAdapterStatus] = None
