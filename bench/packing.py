"""Packing (`spec.dataset.packing`): the same model and data trained with and without it, in
one run: real tokens/s (padding excluded), wall time, optimizer steps, eval loss and task score,
with ratios against the unpacked baseline measured in the same run.

    python bench/packing.py [--model smollm2|tiny] [--train N] [--max-length 256] [--batch 8]
                            [--epochs 1] [--runs unpacked,packed,matched] [--rounds 1]

Data: the built-in reviews task (`builtin://reviews`, sentiment in one word) with 0-8 neutral
sentences ("We paid by card.") put in front of each review, so chat lengths vary from about
60 to 130 tokens: the mixed short lengths where padding wastes compute and packing should help.
Labels and held-out split are the task's own; the score is `normalizedMatch` on the held-out
records (greedy answers). Assistant-only loss, LoRA with the trainer's defaults.

Three runs, each its own process, one after the other (`--rounds N` repeats the set,
interleaved, and keeps each run's least disturbed round):
- `unpacked`: per-device batch --batch (padded to the longest chat of the batch);
- `packed`: the same spec with `dataset.packing: true` (a batch is --batch rows of up to
  --max-length tokens, so one epoch takes fewer, larger optimizer steps);
- `matched`: packing with the batch cut so a step holds about as many chats
  as the unpacked batch (the same number of optimizer steps per epoch, the fair comparison of
  the score).

Tokens/s is the trainer's own figure: real tokens (TRL counts the attention mask without
packing, the padding-free row with it) over the training loop's wall time (no eval inside the
loop; the eval loss is computed once, after it). On a shared machine
the wall time depends on the neighbours, so the training loop's CPU seconds (user + system,
all threads) are printed as well: their ratio is the steadier one.

`--model smollm2` (default): SmolLM2-135M-Instruct (fp32 on CPU). `--model tiny`: the built-in
2-layer tiny Llama, for a smoke run in about a minute (it cannot learn the task: score 0).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NEUTRAL = ["We visited on a Tuesday.", "It was raining that day.",
           "I came with two colleagues from work.", "We had booked a week in advance.",
           "Parking was on the street.", "It opened at nine in the morning.",
           "My sister had recommended it to me.", "We paid by card.",
           "It was my first visit there.", "We stayed for about an hour and a half.",
           "The weather was mild for the season.", "I am writing this a day later."]
MODELS = {"smollm2": "builtin://smollm2-135m-instruct", "tiny": "builtin://tiny-llama"}


def _padded(record: dict, rng: random.Random) -> dict:
    """The record with 0-8 neutral sentences before its review (the label is unchanged)."""
    filler = " ".join(rng.sample(NEUTRAL, rng.randint(0, 8)))
    user, answer = record["messages"]
    content = user["content"].replace("Review: ", f"Review: {filler} " if filler else
                                      "Review: ", 1)
    return {"messages": [{"role": "user", "content": content}, answer]}


def write_data(directory: Path, n_train: int, n_eval: int) -> tuple[Path, Path]:
    """Train and held-out JSONL of the mixed-length reviews task."""
    from kubetune_trainer import builtin

    train, held_out = builtin.review_records()
    rng = random.Random(7)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, records in (("train", train[:n_train]), ("eval", held_out[:n_eval])):
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(_padded(r, rng)) + "\n" for r in records))
        paths.append(path)
    return paths[0], paths[1]


def config(out: Path, model: str, train: Path, held_out: Path, args, packing: bool,
           batch: int) -> Path:
    from kubetune.trainerconfig import TrainerConfig

    cfg = TrainerConfig.model_validate({
        "model": {"uri": MODELS[model]},
        "data": {"train": {"uri": f"file://{train}"}, "eval": {"uri": f"file://{held_out}"},
                 "format": "messages", "maxLength": args.max_length, "packing": packing,
                 "assistantOnlyLoss": True},
        "method": {"type": "LoRA"},
        "training": {"epochs": args.epochs, "perDeviceBatchSize": batch,
                     "gradientAccumulationSteps": 1, "loggingSteps": 5, "seed": 42,
                     # no eval inside the training loop: it would be timed as training
                     "evalSteps": 10_000_000},
        "evaluation": {"maxSamples": args.eval, "maxNewTokens": 8},
        "output": {"uri": f"file://{out}/output"},
        "logging": {"stdout": False, "file": str(out / "events.jsonl"),
                    "termination_log": str(out / "summary.json")},
        "cache_dir": str(Path.home() / ".cache" / "kubetune" / "run-cache"),
        "work_dir": str(out / "work")})
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(cfg.dump())
    return path


def child(config_path: str, result_path: str) -> int:
    """One training run in this process; writes the phases' wall and CPU clocks."""
    from kubetune.trainerconfig import TrainerConfig
    from kubetune_trainer import train

    clocks = []

    def listener(event: dict) -> None:
        if event.get("event") == "phase" or event.get("final"):
            name = event["phase"] if event.get("event") == "phase" else "trained"
            clocks.append((name, time.monotonic(), time.process_time()))

    code = train.run(TrainerConfig.load(config_path), listeners=[listener])
    clocks.append(("end", time.monotonic(), time.process_time()))
    Path(result_path).write_text(json.dumps({"code": code, "clocks": clocks}))
    return code


def measure(cfg_path: Path) -> dict:
    """Run one configuration in a fresh process; its metrics and training-loop clocks."""
    out = cfg_path.parent
    started = time.monotonic()
    proc = subprocess.run([sys.executable, __file__, "--child", str(cfg_path),
                           str(out / "clocks.json")], capture_output=True, text=True)
    wall = time.monotonic() - started
    summary = json.loads((out / "summary.json").read_text())
    if proc.returncode != 0 or summary.get("status") != "Succeeded":
        raise SystemExit(f"run failed: {cfg_path}\n{summary.get('message')}\n"
                         f"{proc.stderr[-3000:]}")
    clocks = json.loads((out / "clocks.json").read_text())["clocks"]
    _, wall0, cpu0 = next(c for c in clocks if c[0] == "training")
    _, wall1, cpu1 = next(c for c in clocks if c[0] == "trained")
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    checks = [e["message"] for e in events if e["event"] == "check"]
    return {"metrics": summary["metrics"], "loop_wall": wall1 - wall0, "loop_cpu": cpu1 - cpu0,
            "process_wall": wall, "checks": checks}


def _chats_per_row(train: Path, model: str, max_length: int) -> float:
    """Mean chats per packed row: how much smaller a packed batch can be for the same chats."""
    from transformers import AutoTokenizer

    from kubetune_trainer import builtin

    cache = Path.home() / ".cache" / "kubetune" / "run-cache"
    tokenizer = AutoTokenizer.from_pretrained(str(builtin.model_path(
        MODELS[model].split("//")[1], cache)))
    lengths = [min(len(tokenizer.apply_chat_template(json.loads(line)["messages"],
                                                     tokenize=True, return_dict=True)
                       ["input_ids"]), max_length)
               for line in train.read_text().splitlines()]
    print(f"Chat lengths: {min(lengths)}-{max(lengths)} tokens, mean "
          f"{sum(lengths) / len(lengths):.0f}; {sum(lengths)} tokens in {len(lengths)} chats")
    return max_length / (sum(lengths) / len(lengths))


def _row(label: str, r: dict, base: dict) -> str:
    m, b = r["metrics"], base["metrics"]
    tps, cps = m["tokensPerSecond"], m["numTokens"] / r["loop_cpu"]
    base_cps = b["numTokens"] / base["loop_cpu"]
    score = m.get("normalizedMatch")
    wall, base_wall = r["loop_wall"], base["loop_wall"]
    return (f"{label:28}{tps:>9.1f}{tps / b['tokensPerSecond']:>7.2f}{cps:>11.1f}"
            f"{cps / base_cps:>7.2f}{wall:>8.0f}{wall / base_wall:>7.2f}"
            f"{m['steps']:>6}{m['numTokens']:>8}{m.get('evalLoss', float('nan')):>9.4f}"
            f"{score if score is not None else float('nan'):>7.3f}"
            f"  {m['packing']['mode']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--train", type=int, default=240, help="training chats (default 240)")
    parser.add_argument("--eval", type=int, default=60, help="held-out chats scored")
    parser.add_argument("--max-length", type=int, default=None,
                        help="default 256 (smollm2), 1024 (tiny: its tokenizer is verbose)")
    parser.add_argument("--batch", type=int, default=8, help="unpacked per-device batch")
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--runs", default="unpacked,packed,matched",
                        help="which of unpacked,packed,matched to run (default all three)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the set N times, interleaved; each run's best round is shown")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    args.max_length = args.max_length or (256 if args.model == "smollm2" else 1024)

    import torch

    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-packing-"))
    train, held_out = write_data(work / "data", args.train, args.eval)
    per_row = _chats_per_row(train, args.model, args.max_length)
    matched = max(1, round(args.batch / per_row))
    print(f"Model {MODELS[args.model]}, LoRA, {args.train} chats x {args.epochs:g} epoch, "
          f"maxLength {args.max_length}, CPU ({torch.get_num_threads()} threads); a packed row "
          f"holds ~{per_row:.1f} chats, so {matched} packed rows ~ {args.batch} chats")
    wanted = set(args.runs.split(",")) | {"unpacked"}  # the baseline of the ratios
    variants = [(name, packing, batch) for name, packing, batch in (
        ("unpacked", False, args.batch), ("packed", True, args.batch),
        ("matched", True, matched)) if name in wanted]
    rounds: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    for index in range(args.rounds):
        for name, packing, batch in variants:  # interleaved: a neighbour's load hits all
            out = work / f"{name}-{index}"
            result = measure(config(out, args.model, train, held_out, args, packing, batch))
            rounds[name].append(result)
            m = result["metrics"]
            print(f"  round {index + 1} {name}: {m['tokensPerSecond']} tok/s, "
                  f"{m['numTokens'] / result['loop_cpu']:.1f} tok/cpu-s, score "
                  f"{m.get('normalizedMatch')}, evalLoss {m.get('evalLoss')}")
            for message in result["checks"]:
                print(f"  {name}: check: {message}")
    # the least disturbed round of each (training is seeded: loss and score repeat exactly)
    runs = {name: max(results, key=lambda r: r["metrics"]["tokensPerSecond"])
            for name, results in rounds.items()}
    base = runs["unpacked"]
    print(f"{'':28}{'tok/s':>9}{'ratio':>7}{'tok/cpu-s':>11}{'ratio':>7}{'wall s':>8}"
          f"{'ratio':>7}{'steps':>6}{'tokens':>8}{'evalLoss':>9}{'score':>7}  mode")
    labels = {"unpacked": f"unpacked (batch {args.batch})",
              "packed": f"packed (batch {args.batch} rows)",
              "matched": f"packed (batch {matched} rows)"}
    for name, result in runs.items():
        print(_row(labels[name], result, base))
    print(f"Runs under {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
