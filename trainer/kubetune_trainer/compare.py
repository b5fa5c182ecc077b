"""`kubetune compare FINETUNEJOB.yaml`: the job's data through every method, measured.

Each method trains under the job's budget (steps or epochs, batch, max length, seed) in its own
process, so peak memory is that method's alone: the untrained base, full fine-tuning, LoRA,
DoRA, QLoRA, prefix tuning, IA3 and bottleneck adapters. For each it records trainable
parameters, peak memory (GPU: torch's peak allocation; CPU: the process's peak RSS), training
tokens/s, wall time, eval loss, the task score on the eval split and the artifact's size, then
writes comparison.json, comparison.md and comparison.png into the output folder.

Every method uses its own default learning rate
(``trainerconfig.default_learning_rate``), except the
job's own method, which keeps the job's; ``--learning-rate`` sets one for all.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

METHODS = ("Base", "Full", "LoRA", "DoRA", "QLoRA", "PrefixTuning", "IA3", "Adapter")
FIELDS = ("method", "trainable_params", "trainable_percent", "peak_memory_bytes",
          "tokens_per_second", "wall_seconds", "eval_loss", "score", "exact_match",
          "artifact_bytes", "learning_rate", "steps")


class CompareError(ValueError):
    """Bad arguments or job; one line."""


def method_spec(name: str, job_method):
    """The MethodSpec a comparison row trains (the job's own settings where they apply)."""
    from kubetune.api.finetunejob import LoraSpec, MethodSpec

    own = job_method.type
    if name in ("LoRA", "QLoRA", "DoRA"):
        lora = job_method.lora if own in ("LoRA", "QLoRA") and job_method.lora else LoraSpec()
        lora = lora.model_copy(update={"use_dora": name == "DoRA"})
        return MethodSpec(type="QLoRA" if name == "QLoRA" else "LoRA", lora=lora,
                          quantization=job_method.quantization if own == "QLoRA" else None)
    if name in ("PrefixTuning", "IA3", "Adapter"):
        block = {"PrefixTuning": "prefix", "IA3": "ia3", "Adapter": "adapter"}[name]
        return MethodSpec(type=name, **({block: getattr(job_method, block)}
                                        if own == name else {}))
    return None  # Base and Full have no PEFT settings


def is_jobs_method(name: str, job_method) -> bool:
    dora = bool(job_method.lora and job_method.lora.use_dora)
    return (name == "DoRA" and job_method.type == "LoRA" and dora) or \
        (name == job_method.type and not dora)


def plan(job, methods: list[str], learning_rate: float | None, max_steps: int | None,
         max_samples: int | None, root: Path) -> list[dict]:
    """One child spec per method: the TrainerConfig to run and where its result goes."""
    from kubetune.trainerconfig import from_finetunejob
    from kubetune.trainerconfig import default_learning_rate

    cfg = from_finetunejob(job, termination_log=os.devnull)
    if cfg.data.eval is None and not cfg.data.eval_fraction:
        raise CompareError("the job has no evaluation data (dataset.eval or "
                           "dataset.evalFraction): nothing to score the methods on")
    if max_steps:
        cfg.training.max_steps, cfg.training.epochs = max_steps, None
    if max_samples:
        cfg.evaluation.max_samples = max_samples
    cfg.evaluation.score = True
    specs = []
    for name in methods:
        run = cfg.model_copy(deep=True)
        spec = method_spec(name, job.spec.method)
        if spec is not None:
            run.method = spec
        rate = learning_rate or (job.spec.training.learning_rate
                                 if is_jobs_method(name, job.spec.method)
                                 and job.spec.training.learning_rate else
                                 default_learning_rate("Full" if name == "Full" else
                                                       run.method.type))
        run.training.learning_rate = None if name == "Base" else rate
        run.training.gradient_checkpointing = False if name == "PrefixTuning" else \
            run.training.gradient_checkpointing
        run.merge = None
        folder = root / "methods" / name
        run.output.uri = f"file://{folder / 'output'}"
        run.work_dir = str(folder / "work")
        run.cache_dir = str(cache_dir())
        specs.append({"name": name, "config": run.model_dump(mode="json", by_alias=True,
                                                             exclude_none=True),
                      "result": str(folder / "result.json")})
    return specs


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kubetune" / \
        "run-cache"


# ---- one method, in its own process ------------------------------------------------------------
def run_one(spec: dict) -> dict:
    import torch

    from . import inputs, methods, scoring
    from kubetune.trainerconfig import TrainerConfig
    from kubetune.storage import Storage
    from .train import _trainer, save_adapter, trained_tokens

    import peft  # noqa: F401 - imported before the baseline is taken
    import transformers  # noqa: F401
    import trl  # noqa: F401

    name = spec["name"]
    imports_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cfg = TrainerConfig.model_validate(spec["config"])
    storage = Storage()
    work = Path(cfg.work_dir)
    paths = inputs.fetch(cfg, storage)
    model_path = paths.model
    tokenizer, loaded = inputs.prepare(cfg, paths)
    device = methods.device_for(cfg)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = methods.load_base(cfg, model_path, device)
    if name == "Base":
        model = base
        for p in model.parameters():
            p.requires_grad_(False)
    elif name == "Full":
        model = base
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = methods.apply_method(cfg, base)
    trainable, _ = methods.trainable_parameters(model)
    # 4-bit weights pack two values per byte: count what the model holds, not the bytes
    total = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)
                for p in model.parameters())
    trainer = _trainer(cfg, model, tokenizer, loaded, device, work)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    record: dict = {"method": name, "trainable_params": trainable, "total_params": total,
                    "trainable_percent": round(100.0 * trainable / total, 4) if total else 0.0,
                    "learning_rate": cfg.learning_rate if name != "Base" else None,
                    "imports_rss_bytes": imports_rss}
    started = time.monotonic()
    if name != "Base":
        result = trainer.train()
        tokens = trained_tokens(trainer)
        runtime = float(result.metrics.get("train_runtime", 0)) or None
        record.update(steps=int(trainer.state.global_step),
                      tokens_per_second=round(tokens / runtime, 1) if runtime and tokens
                      else None, train_loss=round(float(result.training_loss), 6))
    else:
        record.update(steps=0, tokens_per_second=None, train_loss=None)
    record["wall_seconds"] = round(time.monotonic() - started, 2)
    record["eval_loss"] = round(float(trainer.evaluate()["eval_loss"]), 6) \
        if loaded.eval is not None else None
    scored = scoring.score(trainer.model, tokenizer, loaded.eval, loaded.format,
                           cfg.evaluation.max_samples, cfg.evaluation.max_new_tokens) or {}
    record.update(score=scored.get("normalizedMatch"), exact_match=scored.get("exactMatch"),
                  score_samples=scored.get("scoreSamples"), answers=scored.get("answers"))
    artifact = work / "artifact"
    if name == "Full":
        trainer.model.save_pretrained(str(artifact), safe_serialization=True)
    elif name != "Base":
        save_adapter(cfg, trainer.model, artifact)
    record["artifact_bytes"] = sum(p.stat().st_size for p in artifact.rglob("*")
                                   if p.is_file()) if artifact.exists() else 0
    record["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated()) if device == "cuda" \
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record["device"] = device
    return record


def _child(spec_path: str) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    spec = json.loads(Path(spec_path).read_text())
    try:
        record = run_one(spec)
    except Exception as exc:  # noqa: BLE001 - a failed method is a row with its error
        record = {"method": spec["name"], "error": f"{type(exc).__name__}: "
                                                   f"{str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    Path(spec["result"]).parent.mkdir(parents=True, exist_ok=True)
    Path(spec["result"]).write_text(json.dumps(record, indent=2))
    return 0 if "error" not in record else 1


# ---- the table -----------------------------------------------------------------------------------
def _mib(n) -> str:
    if n is None:
        return "–"
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


def _num(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _above(record: dict) -> int | None:
    """Peak memory above what the process held after its imports (CPU only)."""
    if record.get("device") == "cuda" or record.get("imports_rss_bytes") is None:
        return None
    return max(record["peak_memory_bytes"] - record["imports_rss_bytes"], 0)


def table(records: list[dict]) -> str:
    full = next((r.get("score") for r in records if r["method"] == "Full"), None)
    lines = ["| method | trainable params | % | peak memory | above imports | tokens/s | wall s "
             "| eval loss | score | exact | vs full | artifact | lr |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} |" + " |" * 11)
            continue
        ratio = f"{100 * r['score'] / full:.0f} %" if full and r.get("score") is not None \
            else "–"
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {r['trainable_percent']:.3f} | "
            f"{_mib(r['peak_memory_bytes'])} | {_mib(_above(r))} | "
            f"{_num(r.get('tokens_per_second'), '.0f')} | "
            f"{_num(r.get('wall_seconds'), '.0f')} | {_num(r.get('eval_loss'), '.4f')} | "
            f"{_num(r.get('score'), '.3f')} | {_num(r.get('exact_match'), '.3f')} | {ratio} | "
            f"{_mib(r['artifact_bytes']) if r.get('artifact_bytes') else '–'} | "
            f"{_num(r.get('learning_rate'), 'g')} |")
    return "\n".join(lines)


def chart(records: list[dict], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if "error" not in r]
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5), dpi=100)
    panels = [("task score (normalized match)", [r.get("score") or 0 for r in rows], "#2ca02c"),
              ("peak memory (MiB)", [r["peak_memory_bytes"] / 2**20 for r in rows], "#1f77b4"),
              ("trainable parameters (%, log)", [max(r["trainable_percent"], 1e-4)
                                                 for r in rows], "#ff7f0e")]
    for ax, (label, values, color) in zip(axes, panels):
        ax.bar(names, values, color=color)
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=45)
        ax.grid(axis="y", alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].set_ylim(0, 1.05)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def compare(manifest: Path, methods: list[str], output: Path, learning_rate: float | None,
            max_steps: int | None, max_samples: int | None, stream=sys.stderr) -> list[dict]:
    from kubetune.api.validation import SpecError, parse

    try:
        job = parse(yaml.safe_load(manifest.read_text()))
    except (SpecError, yaml.YAMLError, OSError) as exc:
        raise CompareError(f"{manifest}: {exc}") from None
    if job.kind != "FineTuneJob":
        raise CompareError(f"{manifest}: kubetune compare takes a FineTuneJob")
    if job.spec.objective != "sft":
        # Its rows (the untrained base, full fine-tuning, task score by generation) are SFT's.
        raise CompareError(f"{manifest}: kubetune compare measures objective sft; this job's "
                           f"objective is {job.spec.objective}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CompareError(f"unknown method(s) {', '.join(unknown)} (known: "
                           f"{', '.join(METHODS)})")
    output.mkdir(parents=True, exist_ok=True)
    specs = plan(job, methods, learning_rate, max_steps, max_samples, output.resolve())
    records = []
    for spec in specs:
        spec_path = Path(spec["result"]).with_name("spec.json")
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps(spec))
        Path(spec["result"]).unlink(missing_ok=True)
        print(f"==> {spec['name']} (lr {spec['config']['training'].get('learningRate')})",
              file=stream, flush=True)
        log = spec_path.with_name("log.txt")
        with open(log, "w") as handle:
            subprocess.run([sys.executable, "-m", "kubetune_trainer.compare", "--child",
                            str(spec_path)], stdout=handle, stderr=subprocess.STDOUT,
                           check=False)
        result = Path(spec["result"])
        record = json.loads(result.read_text()) if result.exists() else \
            {"method": spec["name"], "error": f"the method's process died; see {log}"}
        records.append(record)
        if "error" in record:
            print(f"    failed: {record['error']}", file=stream, flush=True)
        else:
            print(f"    score {_num(record.get('score'), '.3f')}  eval loss "
                  f"{_num(record.get('eval_loss'), '.4f')}  {record['wall_seconds']:.0f} s  "
                  f"peak {_mib(record['peak_memory_bytes'])}", file=stream, flush=True)
    name = job.metadata.get("name", manifest.stem)
    title = f"{name}: {job.spec.base_model.uri} on {job.spec.dataset.train.uri}"
    (output / "comparison.json").write_text(json.dumps(
        {"job": name, "baseModel": job.spec.base_model.uri,
         "dataset": job.spec.dataset.train.uri, "records": records}, indent=2))
    (output / "comparison.md").write_text(f"# {title}\n\n{table(records)}\n\nScore: normalized "
                                          f"exact match on the eval split; peak memory: GPU "
                                          f"allocation on CUDA, process RSS on CPU.\n")
    chart(records, output / "comparison.png", title)
    return records


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="kubetune compare")
    parser.add_argument("--child", required=True)
    args = parser.parse_args(argv)
    return _child(args.child)


if __name__ == "__main__":
    raise SystemExit(main())
