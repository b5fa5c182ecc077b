"""`kubetune run FINETUNEJOB.yaml`: run a FineTuneJob on this machine, without a cluster.

The same trainer the GPU pod runs, with a progress bar on the terminal and, at the end, a
loss-curve picture (PNG) next to the run's events and summary."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import yaml


def _bar(event: dict, width: int = 30) -> str:
    percent = event.get("percent") or 0
    filled = int(width * percent / 100)
    parts = [f"[{'#' * filled}{'.' * (width - filled)}] {percent:5.1f}%",
             f"step {event.get('step')}/{event.get('total_steps')}"]
    if event.get("loss") is not None:
        parts.append(f"loss {event['loss']:.4f}")
    if event.get("eval_loss") is not None:
        parts.append(f"eval {event['eval_loss']:.4f}")
    if event.get("tokens_per_second"):
        parts.append(f"{event['tokens_per_second']:.0f} tok/s")
    if event.get("eta_seconds") is not None:
        parts.append(f"ETA {event['eta_seconds']}s")
    return "  ".join(parts)


class Terminal:
    """Renders events for a person: phases as lines, progress as one rewritten line."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.last_line = 0.0

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "progress":
            line = _bar(event)
            if self.tty:
                self.stream.write("\r" + line.ljust(110))
            elif time.monotonic() - self.last_line > 2 or event.get("final"):
                self.stream.write(line + "\n")
                self.last_line = time.monotonic()
        elif kind == "phase":
            extra = {k: v for k, v in event.items() if k not in ("event", "phase", "time")
                     and v is not None}
            self.stream.write(("\n" if self.tty else "") +
                              f"==> {event['phase']} {json.dumps(extra) if extra else ''}\n")
        elif kind == "check":
            self.stream.write(f"\n{event['severity']}: {event['message']}\n")
        elif kind == "score":
            self.stream.write(("\n" if self.tty else "") + score_line(event) + "\n")
        elif kind == "checkpoint":
            self.stream.write(("\n" if self.tty else "") + f"saved checkpoint at step "
                              f"{event['step']}\n")
        self.stream.flush()


def score_line(event: dict) -> str:
    """One line for a score event: the generation score (sft) or the preference margin (dpo)."""
    if "preferenceAccuracy" in event:
        return (f"held-out preference pairs: log-prob margin (chosen - rejected) base "
                f"{event['basePreferenceMargin']:.3f} -> fine-tuned "
                f"{event['preferenceMargin']:.3f}; margin raised on "
                f"{event['preferenceAccuracy']:.0%} of the pairs")
    return (f"scored {event['scoreSamples']} held-out records: normalized match "
            f"{event['normalizedMatch']:.2f}")


def loss_curve(events_file: Path, out: Path, title: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    train = [(e["step"], e["loss"]) for e in events
             if e["event"] == "progress" and e.get("loss") is not None and not e.get("final")]
    evals = sorted({(e["step"], e["eval_loss"]) for e in events
                    if e["event"] == "progress" and e.get("evaluated")})
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(*zip(*train), label="train loss", color="#1f77b4")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="#d62728")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def quiet_third_party() -> None:
    """Hide what a newcomer cannot act on: third-party deprecation warnings, progress bars of
    weight loading and dataset mapping, notes about optional kernels (`--verbose` keeps them)."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("bitsandbytes", "torch", "accelerate", "peft", "trl", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def side_by_side(events_file: Path, stream=sys.stderr) -> None:
    """Held-out prompts answered by the base and by the fine-tuned model, and the score."""
    events = [json.loads(line) for line in events_file.read_text().splitlines() if line]
    scores = [e for e in events if e.get("event") == "score"]
    if not scores:
        return
    score = scores[-1]
    if "preferenceAccuracy" in score:  # dpo: no generations to show, the margin says it
        stream.write("\n" + score_line(score) + "\n")
    elif score.get("baseNormalizedMatch") is not None:
        stream.write(f"\nTask score on {score['scoreSamples']} held-out records (normalized "
                     f"match): base {score['baseNormalizedMatch']:.2f} -> fine-tuned "
                     f"{score['normalizedMatch']:.2f} (exact match {score.get('baseExactMatch', 0):.2f}"
                     f" -> {score['exactMatch']:.2f})\n")
    else:
        stream.write(f"\nTask score on {score['scoreSamples']} held-out records: normalized "
                     f"match {score['normalizedMatch']:.2f}, exact match "
                     f"{score['exactMatch']:.2f}\n")
    for item in score.get("answers") or []:
        stream.write("\n  prompt:     " + item["prompt"].replace("\n", "\n              ") + "\n")
        if "baseAnswer" in item:
            stream.write(f"  base:       {item['baseAnswer'][:200]!r}\n")
        stream.write(f"  fine-tuned: {item['answer'][:200]!r}   (expected {item['reference']!r})\n")
    stream.flush()


def run_local(manifest: Path, output: str | None, runs_dir: Path, max_steps: int | None,
              quiet: bool = False, verbose: bool = False) -> int:
    if not verbose:
        quiet_third_party()
    from kubetune.api.validation import SpecError, parse

    from kubetune.trainerconfig import LoggingConfig, from_finetunejob
    from .train import run

    try:
        job = parse(yaml.safe_load(manifest.read_text()))
    except (SpecError, yaml.YAMLError, OSError) as exc:
        print(f"kubetune: error: {manifest}: {exc}", file=sys.stderr)
        return 2
    if job.kind != "FineTuneJob":
        print(f"kubetune: error: {manifest}: kubetune run takes a FineTuneJob", file=sys.stderr)
        return 2
    if job.spec.runtime_ref is not None:  # its values live in the cluster: do not guess them
        print(f"kubetune: error: {manifest}: spec.runtimeRef: kubetune run reads no cluster, so "
              f"not the runtime's values; apply the job to a cluster, or copy the runtime's "
              f"values into the spec and drop runtimeRef", file=sys.stderr)
        return 2
    name = job.metadata.get("name", manifest.stem)
    run_dir = (runs_dir / name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = from_finetunejob(job, termination_log=str(run_dir / "summary.json"))
    spec_output = cfg.output.uri
    has_s3 = bool(os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE"))
    if output:
        cfg.output.uri = output
    elif spec_output.startswith("s3://") and not has_s3:
        cfg.output.uri = f"file://{run_dir / 'output'}"
        print(f"No S3 credentials in the environment: writing to {cfg.output.uri} instead of "
              f"{spec_output} (use --output to choose)", file=sys.stderr)
    if max_steps:
        cfg.training.max_steps, cfg.training.epochs = max_steps, None
    cfg.evaluation.score_base = True  # before -> after, printed at the end
    events_file = run_dir / "events.jsonl"
    events_file.unlink(missing_ok=True)
    cfg.logging = LoggingConfig(stdout=False, file=str(events_file),
                                termination_log=str(run_dir / "summary.json"))
    cfg.cache_dir = str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                        / "kubetune" / "run-cache")
    cfg.work_dir = str(run_dir / "work")
    print(f"Running FineTuneJob {name} ({cfg.method.type} on {cfg.model.uri}) locally; "
          f"events in {events_file}", file=sys.stderr)

    code = run(cfg, listeners=[] if quiet else [Terminal()])
    summary = json.loads((run_dir / "summary.json").read_text())
    print("", file=sys.stderr)
    if code == 0:
        png = loss_curve(events_file, run_dir / "loss.png",
                         f"{name}: {cfg.method.type} on {cfg.model.uri}")
        metrics = summary.get("metrics", {})
        print(f"Succeeded: {metrics.get('steps')} steps, train loss "
              f"{metrics.get('trainLoss')}, eval loss {metrics.get('evalLoss')}", file=sys.stderr)
        print(f"Adapter: {summary['artifact']['uri']} (manifest sha256 "
              f"{summary['artifact']['manifestSha256'][:12]}…)", file=sys.stderr)
        if png:
            print(f"Loss curve: {png}", file=sys.stderr)
        side_by_side(events_file)
    else:
        print(f"{summary.get('status')}: {summary.get('message')}", file=sys.stderr)
    return code
