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
    from kubetune.storage import StorageError

    reporter = Reporter(cfg.logging, rank=_rank())
    reporter.listeners.extend(listeners)
    try:
        summary = _train(cfg, reporter)
    except Preempted as exc:
        reporter.summary({"status": "Preempted", "reason": "Preempted", "message": str(exc),
                          "checkpointStep": exc.step})
        return EXIT_PREEMPTED
    except (InvalidInput, DataError, SourceError, MethodError) as exc:
        return _fail(reporter, "InvalidInput", exc, EXIT_INVALID)
    except (StorageError, VerificationError) as exc:
        return _fail(reporter, "StorageError", exc, EXIT_FAILED)
    except Exception as exc:  # noqa: BLE001 - anything else: retryable, reported in one line
        text = str(exc).splitlines()[0] if str(exc) else ""
        oom = "out of memory" in text.lower()
        return _fail(reporter, "OOMKilled" if oom else "Error",
                     RuntimeError(f"{type(exc).__name__}: {text}"), EXIT_FAILED)
    reporter.summary({"status": "Succeeded", **summary})
    return EXIT_OK


def _fail(reporter, reason: str, exc: Exception, code: int) -> int:
    print(f"kubetune-trainer: error: {exc}", file=sys.stderr, flush=True)
    reporter.summary({"status": "Failed", "reason": reason, "message": str(exc)[:2000]})
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


def _train(cfg: TrainerConfig, reporter) -> dict:
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
    model = methods.apply_method(cfg, methods.load_base(cfg, model_path, device))
    lora = cfg.method.lora
    _check(checks.embeddings_saved(lora.modules_to_save if lora else None, model), reporter, cfg)
    packing, findings = decide_packing(cfg, model, tokenizer)
    _check(findings, reporter, cfg)
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

    trainer = _trainer(cfg, model, tokenizer, loaded, device, work, packing=packing)
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
        metrics["evalLoss"] = round(float(trainer.evaluate()["eval_loss"]), 6)
    preemption.uninstall()
    if not main:
        return {"metrics": metrics}
    if loaded.eval is not None and cfg.evaluation.score:
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
                       probe=probe(trainer.model, tokenizer))
    summary = {"artifact": artifact, "metrics": {k: v for k, v in metrics.items()
                                                 if k != "trainLosses"}}
    if cfg.merge is not None:
        from .merge import merge_and_publish

        reporter.phase("merging", uri=cfg.output.merged_uri)
        summary["merged"] = merge_and_publish(cfg, model_path, adapter_dir, storage, work)
    return summary


def trained_tokens(trainer) -> float:
    """Real tokens trained (padding excluded). The log history holds the count as of the last
    logging step only, short of the end when the steps are not a multiple of loggingSteps (a
    packed run's few large steps): TRL's running total is exact."""
    logged = max((float(h.get("num_tokens", 0)) for h in trainer.state.log_history), default=0)
    return max(logged, float(getattr(trainer, "_total_train_tokens", 0) or 0))


def _lengths(tokenizer, loaded, limit: int = 200) -> list[int]:
    lengths = []
    for record in loaded.train.select(range(min(limit, len(loaded.train)))):
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


def _trainer(cfg: TrainerConfig, model, tokenizer, loaded, device: str, work: Path,
             packing=None):
    """The SFTTrainer. `packing`: the Packing decided (and reported) by the caller; decided
    here, unreported, when None."""
    import torch
    from trl import SFTConfig, SFTTrainer

    from .methods import torch_dtype

    t = cfg.training
    dtype = torch_dtype(cfg, device)
    eval_strategy = "no"
    if loaded.eval is not None:
        eval_strategy = "steps" if t.eval_steps else "epoch"
    args = SFTConfig(
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
        **(packing or decide_packing(cfg, model, tokenizer)[0]).sft_args(),
        # assistant-only loss is done by chatmask (works without {% generation %} markers)
        assistant_only_loss=False,
        disable_tqdm=not cfg.logging.progress_bar, dataloader_num_workers=0,
        ddp_backend="gloo" if device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1
        else None,
        activation_checkpointing_kwargs={"use_reentrant": False}
        if cfg.gradient_checkpointing else None,
    )
    train, evaluation = loaded.train, loaded.eval
    if cfg.data.assistant_only_loss:
        from .chatmask import tokenize_dataset

        train = tokenize_dataset(train, tokenizer)
        evaluation = tokenize_dataset(evaluation, tokenizer) if evaluation is not None else None
    return SFTTrainer(model=model, args=args, train_dataset=train,
                      eval_dataset=evaluation, processing_class=tokenizer)


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


def publish(cfg: TrainerConfig, adapter_dir: Path, data_files: list[Path], metrics: dict,
            storage, probe: dict | None = None) -> dict:
    import hashlib
    import json

    from kubetune import artifacts

    digest = hashlib.sha256()
    for path in data_files:
        digest.update(path.read_bytes())
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    rank = adapter_config.get("r")
    manifest = artifacts.build_manifest(
        adapter_dir, kind="adapter",
        method={"type": cfg.method.type, "rank": rank,
                "config": cfg.method.model_dump(mode="json", by_alias=True, exclude_none=True),
                "peftType": adapter_config.get("peft_type")},
        base_model={"uri": cfg.model.uri, "revision": cfg.model.revision},
        dataset={"uri": cfg.data.train.uri, "sha256": digest.hexdigest(),
                 "evalUri": cfg.data.eval.uri if cfg.data.eval else None},
        metrics=metrics, extra={"probe": probe} if probe else None)
    sha = artifacts.upload(adapter_dir, manifest, cfg.output.adapter_uri, storage)
    return {"uri": cfg.output.adapter_uri, "manifestSha256": sha,
            "sizeBytes": manifest["sizeBytes"], "method": cfg.method.type, "rank": rank,
            "baseModelUri": cfg.model.uri, "baseModelRevision": cfg.model.revision}
