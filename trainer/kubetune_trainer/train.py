"""The training recipe: parse → validate → fetch → set up → train → save → upload (→ merge).

Exit codes and the termination summary are the contract with the operator (with the manifest):
``kubetune.contract``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from kubetune.contract import ExitCode
from kubetune.trainerconfig import TrainerConfig

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_PREEMPTED = (
    ExitCode.OK, ExitCode.FAILED, ExitCode.INVALID, ExitCode.PREEMPTED)


class InvalidInput(ValueError):
    """Bad data, model or settings: retrying cannot help."""


class Preempted(RuntimeError):
    def __init__(self, step: int):
        super().__init__(f"stopped by SIGTERM at step {step} after saving a checkpoint")
        self.step = step


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run(cfg: TrainerConfig, listeners=()) -> int:
    """Run one training attempt; returns the process exit code. `listeners` get every event."""
    from kubetune.artifacts import VerificationError
    from .data import DataError
    from .methods import MethodError
    from .progress import Reporter
    from .sources import SourceError
    from .tracking import for_config
    from kubetune.storage import StorageError

    reporter = Reporter(cfg.logging, rank=_rank())
    reporter.listeners.extend(listeners)
    tracker = for_config(cfg, reporter, _rank())
    try:
        summary = _train(cfg, reporter, tracker)
    except Preempted as exc:
        reporter.summary({"status": "Preempted", "reason": "Preempted", "message": str(exc),
                          "checkpointStep": exc.step, "tracking": tracker.finish("KILLED")})
        return EXIT_PREEMPTED
    except (InvalidInput, DataError, SourceError, MethodError) as exc:
        return _fail(reporter, "InvalidInput", exc, EXIT_INVALID, tracker)
    except (StorageError, VerificationError) as exc:
        return _fail(reporter, "StorageError", exc, EXIT_FAILED, tracker)
    except Exception as exc:  # noqa: BLE001 - anything else: retryable, reported in one line
        text = str(exc).splitlines()[0] if str(exc) else ""
        oom = "out of memory" in text.lower()
        return _fail(reporter, "OOMKilled" if oom else "Error",
                     RuntimeError(f"{type(exc).__name__}: {text}"), EXIT_FAILED, tracker)
    reporter.summary({"status": "Succeeded", **summary,
                      "tracking": tracker.finish("FINISHED", summary)})
    return EXIT_OK


def _fail(reporter, reason: str, exc: Exception, code: int, tracker) -> int:
    print(f"kubetune-trainer: error: {exc}", file=sys.stderr, flush=True)
    reporter.summary({"status": "Failed", "reason": reason, "message": str(exc)[:2000],
                      "tracking": tracker.finish("FAILED")})
    return code


def _optimizer(cfg: TrainerConfig, device: str) -> str:
    name = cfg.training.optimizer
    if device == "cpu" and name in ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit",
                                    "adamw_torch_fused"):
        return "adamw_torch"  # paged / 8-bit optimizers need a GPU; same maths in fp32
    return name


def _check(findings, reporter, cfg: TrainerConfig) -> None:
    for severity, message in findings:
        reporter.emit({"event": "check", "severity": severity, "message": message})
        if severity == "error" or cfg.checks.fail_on_warnings:
            raise InvalidInput(message)


def _train(cfg: TrainerConfig, reporter, tracker) -> dict:
    from . import checks, inputs, methods
    from .checkpoints import Checkpoints, Preemption
    from .checkpoints import make_callback as checkpoint_callback
    from .progress import make_callback as progress_callback
    from kubetune.storage import Storage

    preemption = Preemption()
    preemption.install()  # before the slow parts: a SIGTERM while downloading is honoured too
    storage = Storage(cfg.output.endpoint, cfg.output.region)
    work = Path(cfg.work_dir)
    main = _rank() == 0

    reporter.phase("downloading", model=cfg.model.uri, dataset=cfg.data.train.uri)
    paths = inputs.fetch(cfg, storage)
    model_path = paths.model

    reporter.phase("preparing")
    import torch

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    tokenizer, loaded = inputs.prepare(cfg, paths)
    first = loaded.train[0]
    _check(checks.pad_is_eos(tokenizer), reporter, cfg)
    if loaded.format == "messages" and tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template(first["messages"], tokenize=False)
        _check(checks.double_bos(tokenizer, rendered), reporter, cfg)
        if cfg.data.assistant_only_loss:
            _check(checks.assistant_mask(tokenizer, first["messages"]), reporter, cfg)
    _check(checks.truncation(_lengths(tokenizer, loaded), cfg.data.max_length,
                             cfg.checks.max_truncation_rate), reporter, cfg)

    device = methods.device_for(cfg)
    base = methods.load_base(cfg, model_path, device)
    if cfg.objective == "dpo":  # preference pairs are never packed (refused at admission)
        from .packing import Packing

        packing = Packing(requested=False)
        trainer = _dpo_trainer(cfg, base, tokenizer, loaded, device, work)
        model = trainer.model  # the PeftModel TRL wrapped (or the base with bottleneck adapters)
    else:
        model = methods.apply_method(cfg, base)
        packing, findings = decide_packing(cfg, model, tokenizer)
        _check(findings, reporter, cfg)
        trainer = _trainer(cfg, model, tokenizer, loaded, device, work, packing=packing)
    lora = cfg.method.lora
    _check(checks.embeddings_saved(lora.modules_to_save if lora else None, model), reporter, cfg)
    trainable, total = methods.trainable_parameters(model)
    reporter.emit({"event": "model", "method": cfg.method.type, "device": device,
                   "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                   "trainable_parameters": trainable, "total_parameters": total,
                   "packing": packing.metrics()})

    checkpoints = Checkpoints(cfg, storage, reporter)
    resume_from = None
    if cfg.checkpointing.resume == "Latest":
        found = checkpoints.latest(work / "resume")
        if found:
            resume_from = found
            reporter.phase("resuming", step=found[0])

    from .tracking import params as tracking_params

    tracker.start(tracking_params(cfg, data_sha256(loaded.digest_source), trainable))
    progress = progress_callback(reporter)
    ckpt = checkpoint_callback(cfg, checkpoints, preemption, is_main=main)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # stdout carries our JSON events only
    trainer.add_callback(progress)
    trainer.add_callback(ckpt)

    reporter.phase("training", resumed_from_step=resume_from[0] if resume_from else None)
    result = trainer.train(resume_from_checkpoint=str(resume_from[1]) if resume_from else None)
    if ckpt.preempted_at is not None:
        raise Preempted(ckpt.preempted_at)
    tokens = trained_tokens(trainer)
    runtime = float(result.metrics.get("train_runtime", 0)) or None
    metrics = {"trainLoss": round(float(result.training_loss), 6),
               "steps": int(trainer.state.global_step),
               "tokensPerSecond": round(tokens / runtime, 1) if runtime and tokens else None,
               "trainRuntimeSeconds": runtime, "numTokens": int(tokens),
               "resumedFromStep": resume_from[0] if resume_from else None,
               "trainLosses": progress.train_losses[-200:], "packing": packing.metrics()}
    if loaded.eval is not None:
        evaluated = trainer.evaluate()
        metrics["evalLoss"] = round(float(evaluated["eval_loss"]), 6)
        if cfg.objective == "dpo":
            metrics.update(preference_metrics(evaluated, cfg.dpo_settings.beta))
    preemption.uninstall()
    if not main:
        return {"metrics": metrics}
    if cfg.objective == "dpo" and "preferenceAccuracy" in metrics:
        reporter.emit({"event": "score", **{k: metrics[k] for k in PREFERENCE_METRICS}})
    if loaded.eval is not None and cfg.evaluation.score and cfg.objective == "sft":
        from .scoring import score

        reporter.phase("scoring", samples=min(len(loaded.eval), cfg.evaluation.max_samples))
        scored = score(trainer.model, tokenizer, loaded.eval, loaded.format,
                       cfg.evaluation.max_samples, cfg.evaluation.max_new_tokens)
        if scored:
            answers = scored.pop("answers")
            metrics.update(scored)
            if cfg.evaluation.score_base and hasattr(trainer.model, "disable_adapter"):
                with trainer.model.disable_adapter():  # the untrained base, same weights
                    before = score(trainer.model, tokenizer, loaded.eval, loaded.format,
                                   cfg.evaluation.max_samples, cfg.evaluation.max_new_tokens)
                metrics["baseExactMatch"] = before["exactMatch"]
                metrics["baseNormalizedMatch"] = before["normalizedMatch"]
                for mine, theirs in zip(answers, before["answers"]):
                    mine["baseAnswer"] = theirs["answer"]
            reporter.emit({"event": "score", **{k: v for k, v in metrics.items()
                                                 if "Match" in k or k == "scoreSamples"},
                           "answers": answers})

    reporter.phase("uploading", uri=cfg.output.adapter_uri)
    adapter_dir = work / "adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    save_adapter(cfg, trainer.model, adapter_dir)
    from .loading import probe

    artifact = publish(cfg, adapter_dir, loaded.digest_source, metrics, storage,
                       probe=probe(trainer.model, tokenizer), tracking=tracker.lineage())
    summary = {"artifact": artifact, "metrics": {k: v for k, v in metrics.items()
                                                 if k != "trainLosses"}}
    if cfg.merge is not None:
        from .merge import merge_and_publish

        reporter.phase("merging", uri=cfg.output.merged_uri)
        summary["merged"] = merge_and_publish(cfg, model_path, adapter_dir, storage, work)
    return summary


PREFERENCE_METRICS = ("preferenceAccuracy", "preferenceMargin", "basePreferenceMargin",
                      "rewardMargin")


def preference_metrics(evaluated: dict, beta: float) -> dict:
    """The eval pass of a DPO run as held-out preference metrics. TRL logs the mean log-probs
    of the chosen and rejected answers under the adapter and the rewards beta * (log p -
    log p_ref), so the base model's margin follows without another pass over the data."""
    margin = evaluated["eval_logps/chosen"] - evaluated["eval_logps/rejected"]
    reward_margin = evaluated["eval_rewards/margins"]
    return {"preferenceAccuracy": round(float(evaluated["eval_rewards/accuracies"]), 4),
            "preferenceMargin": round(float(margin), 4),
            "basePreferenceMargin": round(float(margin - reward_margin / beta), 4),
            "rewardMargin": round(float(reward_margin), 6)}


def trained_tokens(trainer) -> float:
    """Real tokens trained (padding excluded). The log history holds the count as of the last
    logging step only, short of the end when the steps are not a multiple of loggingSteps (a
    packed run's few large steps): TRL's running total is exact."""
    logged = max((float(h.get("num_tokens", 0)) for h in trainer.state.log_history), default=0)
    return max(logged, float(getattr(trainer, "_total_train_tokens", 0) or 0))


def _lengths(tokenizer, loaded, limit: int = 200) -> list[int]:
    lengths = []
    for record in loaded.train.select(range(min(limit, len(loaded.train)))):
        if "chosen" in record:
            lengths.append(_pair_length(tokenizer, record))
            continue
        if "messages" in record:
            ids = tokenizer.apply_chat_template(record["messages"], tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        elif "prompt" in record:
            ids = tokenizer(record["prompt"] + record["completion"])["input_ids"]
        else:
            ids = tokenizer(record["text"])["input_ids"]
        lengths.append(len(ids))
    return lengths


def decide_packing(cfg: TrainerConfig, model, tokenizer):
    """(Packing, check findings): packing is measured on the model we train (see packing.py)."""
    from .packing import decide

    return decide(cfg, model, tokenizer)


def _pair_length(tokenizer, record) -> int:
    """Tokens of a preference pair's longer sequence (prompt + chosen or + rejected)."""
    longest = max((record["chosen"], record["rejected"]), key=lambda a: len(str(a)))
    if isinstance(record["prompt"], list):
        ids = tokenizer.apply_chat_template(record["prompt"] + longest, tokenize=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return len(tokenizer(record["prompt"] + longest)["input_ids"])


def _common_args(cfg: TrainerConfig, loaded, device: str, work: Path) -> dict:
    """TrainingArguments shared by the SFT and DPO configs."""
    import torch

    from .methods import torch_dtype

    t = cfg.training
    dtype = torch_dtype(cfg, device)
    eval_strategy = "no"
    if loaded.eval is not None:
        eval_strategy = "steps" if t.eval_steps else "epoch"
    return dict(
        output_dir=str(work / "trainer"),
        num_train_epochs=t.epochs or 1, max_steps=t.max_steps or -1,
        learning_rate=cfg.learning_rate, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps if t.warmup_steps is not None else t.warmup_ratio,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        optim=_optimizer(cfg, device), weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, activation_checkpointing=cfg.gradient_checkpointing,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, seed=t.seed,
        data_seed=t.seed, logging_steps=t.logging_steps, logging_first_step=True,
        eval_strategy=eval_strategy, eval_steps=t.eval_steps, save_strategy="no",
        save_total_limit=cfg.checkpointing.keep_last, report_to=[],
        use_cpu=device == "cpu", max_length=cfg.data.max_length,
        disable_tqdm=not cfg.logging.progress_bar, dataloader_num_workers=0,
        ddp_backend="gloo" if device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1
        else None,
        activation_checkpointing_kwargs={"use_reentrant": False}
        if cfg.gradient_checkpointing else None,
    )


def _trainer(cfg: TrainerConfig, model, tokenizer, loaded, device: str, work: Path,
             packing=None):
    """The SFTTrainer. `packing`: the Packing decided (and reported) by the caller; decided
    here, unreported, when None."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        **_common_args(cfg, loaded, device, work),
        **(packing or decide_packing(cfg, model, tokenizer)[0]).sft_args(),
        # assistant-only loss is done by chatmask (works without {% generation %} markers)
        assistant_only_loss=False)
    train, evaluation = loaded.train, loaded.eval
    if cfg.data.assistant_only_loss:
        from .chatmask import tokenize_dataset

        train = tokenize_dataset(train, tokenizer)
        evaluation = tokenize_dataset(evaluation, tokenizer) if evaluation is not None else None
    return SFTTrainer(model=model, args=args, train_dataset=train,
                      eval_dataset=evaluation, processing_class=tokenizer)


def _dpo_trainer(cfg: TrainerConfig, base, tokenizer, loaded, device: str, work: Path):
    """TRL's DPOTrainer on `base` with the job's PEFT method. The reference is the base with the
    adapter disabled: TRL wraps the base itself (peft_config) and, with ref_model None,
    computes reference log-probs under `disable_adapter()`, so no second model is loaded.
    Bottleneck adapters are no PEFT model: their reference log-probs are computed once, before
    training, while their zero-initialised up-projections still leave the base unchanged."""
    from trl import DPOConfig, DPOTrainer

    from .methods import MethodError, prepare

    model, peft_config = prepare(cfg, base)
    dpo = cfg.dpo_settings
    losses, weights = [dpo.loss_type], None
    if dpo.sft_weight:
        losses, weights = [dpo.loss_type, "sft"], [1.0, dpo.sft_weight]
    args = DPOConfig(**_common_args(cfg, loaded, device, work), beta=dpo.beta,
                     loss_type=losses, loss_weights=weights,
                     label_smoothing=dpo.label_smoothing,
                     precompute_ref_log_probs=peft_config is None)
    try:
        return DPOTrainer(model=model, ref_model=None, args=args, train_dataset=loaded.train,
                          eval_dataset=loaded.eval, processing_class=tokenizer,
                          peft_config=peft_config)
    except ValueError as exc:  # TRL's refusals of a setting: one line, not retryable
        raise MethodError(f"cannot train {cfg.method.type} with objective dpo: "
                          f"{str(exc).splitlines()[0]}") from None


def base_model_ref(cfg: TrainerConfig) -> str:
    return cfg.model.uri + (f"@{cfg.model.revision}" if cfg.model.revision and
                            "@" not in cfg.model.uri else "")


def save_adapter(cfg: TrainerConfig, model, directory: Path) -> None:
    """Save the adapter; its config names the real base URI, not a temporary folder."""
    import json

    from . import bottleneck

    if cfg.method.type == "Adapter":
        bottleneck.save(model, directory, base_model_ref(cfg))
        return
    model.save_pretrained(str(directory), safe_serialization=True)
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model_ref(cfg)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    (directory / "README.md").unlink(missing_ok=True)  # a model card naming a temp folder


def data_sha256(data_files: list[Path]) -> str:
    """The training data's digest (the files in order, streamed)."""
    import hashlib

    digest = hashlib.sha256()
    for path in data_files:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def publish(cfg: TrainerConfig, adapter_dir: Path, data_files: list[Path], metrics: dict,
            storage, probe: dict | None = None, tracking: dict | None = None) -> dict:
    """Upload the adapter with its manifest; `tracking` (the run) is recorded in it too."""
    import json

    from kubetune import artifacts

    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    rank = adapter_config.get("r")
    manifest = artifacts.build_manifest(
        adapter_dir, kind="adapter",
        method={"type": cfg.method.type, "rank": rank,
                "config": cfg.method.model_dump(mode="json", by_alias=True, exclude_none=True),
                "peftType": adapter_config.get("peft_type")},
        base_model={"uri": cfg.model.uri, "revision": cfg.model.revision},
        dataset={"uri": cfg.data.train.uri, "sha256": data_sha256(data_files),
                 "evalUri": cfg.data.eval.uri if cfg.data.eval else None},
        metrics=metrics, extra={**({"probe": probe} if probe else {}),
                                **({"tracking": tracking} if tracking else {})} or None)
    sha = artifacts.upload(adapter_dir, manifest, cfg.output.adapter_uri, storage)
    return {"uri": cfg.output.adapter_uri, "manifestSha256": sha,
            "sizeBytes": manifest["sizeBytes"], "method": cfg.method.type, "rank": rank,
            "baseModelUri": cfg.model.uri, "baseModelRevision": cfg.model.revision}
