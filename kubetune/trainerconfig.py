"""The trainer's configuration: what the operator renders from a FineTuneJob and mounts.

A contract between the operator and the trainer, so it lives here and not in the trainer:
the operator validates and renders it without importing the trainer. It reuses the API's blocks
for what the user wrote (model, data, method, training, checkpointing, merge) and adds what the
trainer needs to run (output location, progress sinks, run identity). Impossible combinations
fail here, before a GPU is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from kubetune.api.finetunejob import (BASE_REWRITING_INITS, MERGEABLE_METHODS, BaseModelSpec,
                                      CheckpointingSpec, DatasetSpec, DpoSpec, EvaluationSpec,
                                      FineTuneJob, MergeSpec, MethodSpec, MlflowSpec, Objective,
                                      TrainingSpec)

_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's, where PyYAML was built with it

# Peak learning rates per method when training.learningRate is unset: measured on
# SmolLM2-135M-Instruct with the built-in reviews task (bench/methods_table.py, docs/methods.md).
DEFAULT_LEARNING_RATES = {"LoRA": 5e-4, "QLoRA": 5e-4, "PrefixTuning": 1e-2, "IA3": 1e-2,
                          "Adapter": 1e-3, "Full": 5e-5}


DPO_LEARNING_RATE_SCALE = 0.1


def default_learning_rate(method: str) -> float:
    return DEFAULT_LEARNING_RATES.get(method, 2e-4)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True,
                              populate_by_name=True)


class OutputConfig(_Model):
    uri: str
    """Output prefix (s3:// or file://); adapter in <uri>/adapter, checkpoints in <uri>/checkpoints."""
    endpoint: Optional[str] = None
    """S3 endpoint URL; default from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL."""
    region: Optional[str] = None
    """S3 region; default from AWS_DEFAULT_REGION."""

    @property
    def adapter_uri(self) -> str:
        return self.uri.rstrip("/") + "/adapter"

    @property
    def checkpoints_uri(self) -> str:
        return self.uri.rstrip("/") + "/checkpoints"

    @property
    def merged_uri(self) -> str:
        return self.uri.rstrip("/") + "/merged"


class StatusSink(_Model):
    """Patch FineTuneJob status with the pod's service-account token (narrow RBAC)."""

    namespace: str
    """Namespace of the FineTuneJob."""
    name: str
    """Name of the FineTuneJob."""
    attempt: int = 0
    """Attempt number, recorded with progress."""
    min_interval_seconds: float = 2.0
    """Do not patch more often than this (the final event is always sent)."""


class LoggingConfig(_Model):
    stdout: bool = True
    """One JSON event per line on stdout."""
    file: Optional[str] = None
    """Also append events to this JSONL file."""
    status: Optional[StatusSink] = None
    """Also send progress to the FineTuneJob's status."""
    termination_log: str = "/dev/termination-log"
    """Where the final summary goes (the container's terminationMessagePath)."""
    progress_bar: bool = False
    """A human progress bar on stderr (kubetune run)."""


class TrackingConfig(_Model):
    """Where the trainer logs its run, and what finds the run again: every attempt of one
    FineTuneJob (same uid) continues one MLflow run, found by its kubetune.job-uid tag."""

    mlflow: MlflowSpec
    """The tracking server, experiment, run name and tags."""
    job_uid: Optional[Annotated[str, Field(pattern=r"^[A-Za-z0-9-]{1,64}$")]] = None
    """The FineTuneJob's metadata.uid; without it (kubetune run) every run starts a new one."""
    job_name: Annotated[str, Field(max_length=253)] = "finetunejob"
    """The FineTuneJob's name (tag kubetune.job, default run name)."""
    namespace: Optional[Annotated[str, Field(max_length=63)]] = None
    """The FineTuneJob's namespace (tag kubetune.namespace)."""
    request_timeout_seconds: Annotated[float, Field(gt=0, le=120)] = 10.0
    """Deadline of one HTTP request to the tracking server."""
    start_budget_seconds: Annotated[float, Field(gt=0, le=600)] = 30.0
    """Deadline of finding or creating the run before training starts."""
    finish_budget_seconds: Annotated[float, Field(gt=0, le=600)] = 30.0
    """Deadline of the last writes (remaining metrics, final metrics, the artifact's digest)."""
    flush_seconds: Annotated[float, Field(gt=0, le=600)] = 5.0
    """Per-step metrics are sent in batches at most this often (off the training thread)."""


class RunChecks(_Model):
    max_truncation_rate: Annotated[float, Field(ge=0, le=1)] = 0.2
    """Fail when more than this fraction of training sequences is truncated."""
    fail_on_warnings: bool = False
    """Turn the runtime checks' warnings into errors."""


class TrainerConfig(_Model):
    """Everything one training run needs."""

    model: BaseModelSpec
    """Base model."""
    data: DatasetSpec
    """Training data."""
    method: MethodSpec
    """PEFT method."""
    objective: Objective = "sft"
    """sft (supervised) or dpo (preference tuning on prompt/chosen/rejected pairs)."""
    dpo: Optional[DpoSpec] = None
    """DPO settings (objective dpo); unset means the defaults."""
    training: TrainingSpec = Field(default_factory=lambda: TrainingSpec(epochs=1))
    """Optimisation."""
    checkpointing: CheckpointingSpec = Field(default_factory=CheckpointingSpec)
    """Checkpoints."""
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    """Task scoring of the eval split after training."""
    output: OutputConfig
    """Where results go."""
    merge: Optional[MergeSpec] = None
    """Also produce a merged model."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """Progress sinks."""
    checks: RunChecks = Field(default_factory=RunChecks)
    """Runtime checks."""
    tracking: Optional[TrackingConfig] = None
    """Experiment tracking (best effort: never fails training)."""
    cache_dir: str = "/tmp/kubetune-cache"
    """Download cache for models and data (resumable)."""
    work_dir: str = "/tmp/kubetune-work"
    """Scratch space for checkpoints before upload."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train."""

    @model_validator(mode="after")
    def _cross_field(self):
        method = self.method.type
        if self.merge is not None and self.merge.enabled and method not in MERGEABLE_METHODS:
            raise ValueError(f"merge: {method} adapters cannot be merged into the base model "
                             f"(mergeable: {', '.join(MERGEABLE_METHODS)})")
        if method == "PrefixTuning" and self.training.gradient_checkpointing:
            raise ValueError("training.gradientCheckpointing: prefix tuning does not work with "
                             "gradient checkpointing")
        if self.data.assistant_only_loss and self.data.format not in ("auto", "messages"):
            raise ValueError("data.assistantOnlyLoss needs chat data (format messages)")
        lora = self.method.lora
        if lora is not None and lora.init == "loftq":
            q = self.method.quantization
            if method != "QLoRA" or (q is not None and (q.bits != 4 or q.quant_type != "nf4")):
                raise ValueError("method.lora.init: loftq needs QLoRA with 4-bit nf4")
        self._check_objective()
        if not (self.output.uri.startswith("s3://") or self.output.uri.startswith("file://")):
            raise ValueError("output.uri must be s3://bucket/prefix or file:///path")
        return self

    def _check_objective(self) -> None:
        """The FineTuneJob's objective rules, for configs written by hand (kubetune run)."""
        if self.objective != "dpo":
            if self.dpo is not None:
                raise ValueError("dpo: only valid with objective dpo")
            if self.data.format == "preference":
                raise ValueError("data.format: preference data needs objective dpo")
            return
        if self.data.format not in ("auto", "preference"):
            raise ValueError("data.format: objective dpo needs preference data (prompt, chosen, "
                             "rejected)")
        if self.data.packing or self.data.assistant_only_loss:
            raise ValueError("data.packing and data.assistantOnlyLoss do not apply to "
                             "objective dpo")
        lora = self.method.lora
        if lora is not None and lora.init in BASE_REWRITING_INITS:
            raise ValueError(f"method.lora.init: {lora.init} rewrites the base weights, so the "
                             f"base with the adapter disabled is no DPO reference")

    # ---- resolved settings --------------------------------------------------------------
    @property
    def learning_rate(self) -> float:
        """training.learningRate, else the method's measured default (a tenth of it for dpo:
        preference tuning starts from a model that already answers, and the common practice is
        an order of magnitude below SFT)."""
        if self.training.learning_rate:
            return self.training.learning_rate
        scale = DPO_LEARNING_RATE_SCALE if self.objective == "dpo" else 1.0
        return default_learning_rate(self.method.type) * scale

    @property
    def dpo_settings(self) -> DpoSpec:
        """dpo, else the defaults (objective dpo without a dpo block)."""
        return self.dpo or DpoSpec()

    @property
    def gradient_checkpointing(self) -> bool:
        """Explicit setting, else on for QLoRA (memory) and off otherwise; never for prefix."""
        if self.method.type == "PrefixTuning":
            return False
        if self.training.gradient_checkpointing is not None:
            return self.training.gradient_checkpointing
        return self.method.type == "QLoRA"

    def dump(self) -> str:
        """The config as YAML, with libyaml's emitter where PyYAML has it (5x faster than the
        pure-Python one: the operator renders a config for every job it starts)."""
        return yaml.dump(self.model_dump(mode="json", by_alias=True, exclude_none=True),
                         Dumper=_DUMPER, sort_keys=False)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> "TrainerConfig":
        data = yaml.safe_load(Path(path).read_text())
        for item in overrides or []:
            key, _, value = item.partition("=")
            node = data
            parts = key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = yaml.safe_load(value)
        return cls.model_validate(data)


def from_finetunejob(job: FineTuneJob, *, namespace: str | None = None,
                     attempt: int = 0, status_sink: bool = False,
                     termination_log: str = "/dev/termination-log") -> TrainerConfig:
    """Render the trainer config from a FineTuneJob (the operator and `kubetune run` use it)."""
    spec = job.spec
    name = job.metadata.get("name", "finetunejob")
    logging = LoggingConfig(termination_log=termination_log)
    if status_sink:
        logging.status = StatusSink(namespace=namespace or job.metadata.get("namespace", "default"),
                                    name=name, attempt=attempt)
    merge = spec.output.merge if spec.output.merge and spec.output.merge.enabled else None
    return TrainerConfig(
        model=spec.base_model, data=spec.dataset, method=spec.method,
        objective=spec.objective, dpo=spec.dpo, training=spec.training,
        checkpointing=spec.checkpointing, evaluation=spec.evaluation,
        output=OutputConfig(uri=spec.output.uri, endpoint=spec.output.endpoint,
                            region=spec.output.region),
        merge=merge, logging=logging, tracking=_tracking(job, namespace))


def _tracking(job: FineTuneJob, namespace: str | None) -> TrackingConfig | None:
    if job.spec.tracking is None:
        return None
    return TrackingConfig(mlflow=job.spec.tracking.mlflow, job_uid=job.metadata.get("uid"),
                          job_name=job.metadata.get("name", "finetunejob"),
                          namespace=namespace or job.metadata.get("namespace"))
