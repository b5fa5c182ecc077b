"""Operator settings, from the environment (KUBETUNE_*) and `kubetune operator` flags.

A bad setting fails the operator at start-up with one clear line."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KUBETUNE_", extra="ignore")

    namespaces: list[str] = Field(default_factory=list)
    """Namespaces to watch; empty means cluster-wide."""
    trainer_image: str = "ghcr.io/kubetune/trainer:0.1.0"
    """Default trainer image (spec.resources.image overrides)."""
    trainer_command: list[str] = Field(default_factory=lambda: ["python", "-m", "kubetune_trainer"])
    """Entry point of the trainer image."""
    s3_endpoint: Optional[str] = None
    """Default S3 endpoint for outputs without one."""
    s3_region: str = "us-east-1"
    """Default S3 region."""
    s3_credentials_secret: Optional[str] = None
    """Default Secret (in the job's namespace) with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."""
    allowed_images: list[str] = Field(default_factory=list)
    """Image prefixes a FineTuneJob's spec.resources.image may start with (the default trainer
    image is always allowed; empty: no other)."""
    allowed_service_accounts: list[str] = Field(default_factory=list)
    """ServiceAccounts a FineTuneJob may name in spec.resources.serviceAccountName."""
    allowed_s3_endpoints: list[str] = Field(default_factory=list)
    """S3 endpoints a spec may name besides s3_endpoint (`*`: any)."""
    trainer_rbac: Literal["auto", "shared", "perJob"] = "auto"
    """How a trainer may patch its own job's progress: `shared`, one RoleBinding per namespace
    made safe by the kubetune-trainer-status admission policy (kubetune/api/trainerstatus.py);
    `perJob`, a Role and RoleBinding per job; `auto` picks shared when the policy and its
    binding are installed (checked at start-up)."""
    allowed_tracking_servers: list[str] = Field(default_factory=list)
    """Tracking servers (scheme://host[:port]) a spec's spec.tracking.mlflow.trackingUri may
    name together with a credentialsSecret (`*`: any); without credentials any server is
    allowed (the trainer sends nothing its author did not write)."""
    require_target_opt_in: bool = True
    """A LoRAAdapter changes only Deployments labelled kubetune.io/adapter-target: "true"."""
    gpu_tolerations: bool = True
    """Add a toleration for the nvidia.com/gpu taint to GPU pods."""
    default_node_selector: dict[str, str] = Field(default_factory=dict)
    """Node selector added to GPU pods unless the spec sets one."""
    retry_base_seconds: Optional[int] = None
    """Override every job's retryPolicy.backoffSeconds (tests)."""
    adapter_resync_seconds: float = Field(default=30.0, gt=0)
    """How often each served adapter is re-checked on every replica (drift repair)."""
    adapter_workers: int = Field(default=16, ge=1, le=256)
    """LoRAAdapter reconciles that run at once, all namespaces together."""
    adapter_workers_per_namespace: int = Field(default=2, ge=1)
    """At most this many of them for one namespace: a tenant whose serving pods answer slowly
    (a load may take engine_load_timeout_seconds) holds only its own share of the workers."""
    finetunejob_workers: int = Field(default=16, ge=1, le=256)
    """FineTuneJob reconciles that run at once (off kopf's threads, one per job at a time)."""
    finetunejob_workers_per_namespace: int = Field(default=8, ge=1)
    """At most this many of them for one namespace."""
    vllm_adapter_dir: str = "/adapters"
    """Folder, shared with the sync sidecar, where vLLM pods find adapter files."""
    engine_load_timeout_seconds: float = Field(default=300.0, gt=0)
    """How long one load call to a serving engine may take."""
    s3_deadline_seconds: float = Field(default=30.0, gt=0)
    """An S3 read by the operator must finish within this many seconds plus one per MiB."""
    max_artifact_bytes: int = Field(default=8 * 1024 ** 3, gt=0)
    """Largest artifact (sum of its files) the operator verifies; its digests are streamed,
    nothing is stored, and a larger one is refused before a byte of it is read."""
    merge_deadline_seconds: int = Field(default=3600, gt=0)
    """How long a merge Job may run before Kubernetes stops it (activeDeadlineSeconds)."""
    merge_node_selector: dict[str, str] = Field(default_factory=dict)
    """Node selector of merge Jobs (merged mode)."""
    health_port: int = 8080
    """Port of /healthz."""
    metrics_port: int = 8081
    """Port of /metrics."""
    leader_election: bool = False
    """Active/standby: run only while holding the Lease (coordination.k8s.io/v1)."""
    leader_election_namespace: Optional[str] = None
    """Namespace of the Lease (default: $POD_NAMESPACE, else default)."""
    leader_election_name: str = "kubetune-operator"
    """Name of the Lease."""
    lease_seconds: int = Field(default=15, ge=2, le=300)
    """How long a Lease outlives its last renewal before a standby takes over."""
