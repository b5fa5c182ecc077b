"""Trainer throughput: the seed recipe against our trainer, same model, data and machine, same run.

Seed recipe: plain PEFT + TRL SFTTrainer, LoRA r=16 alpha=32 dropout=0.05 on q/k/v/o, batch 2 x
accumulation 4, lr 2e-4, TRL's defaults otherwise (TRL 1.x turns on bf16 and gradient
checkpointing; bf16 is emulated, slowly, on a CPU without bf16 instructions). `--seed fp32` runs
the same recipe with bf16 and gradient checkpointing off, as our trainer runs LoRA on a CPU:
the ratio against it is our trainer's own overhead. Ours: `kubetune_trainer` with its defaults
(progress events, checkpoint callback and all). Each run is its own process (clean peak RSS).
Prints tokens/s of each and the ratio, time to reach the seed's final eval loss, and peak RSS of
LoRA vs QLoRA.

    python bench/trainer_throughput.py [--model smollm2|toy] [--steps N] [--seed defaults|fp32|both]
                                       [--hidden 256] [--layers 4]

`--model smollm2` (default): SmolLM2-135M-Instruct on the built-in reviews task (40 steps by
default; with `--steps 20` on two CPU cores the seed recipe with TRL's defaults took 33 minutes,
every other run about 3); `--model toy`: a random Llama of --hidden/--layers on tiny-chat.

Both losses are over every token of the rendered chat; ours runs with its own defaults (LoRA
learning rate 5e-4 against the seed's 2e-4), so "time to the seed's final eval loss" measures
the defaults as much as the trainer: the tokens/s ratio against `--seed fp32` is the trainer.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SEED_RECIPE = r'''
import json, sys, time
from pathlib import Path
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer

model_dir, data_file, steps, eval_every, out, variant = sys.argv[1:7]
tuned = {"bf16": False, "gradient_checkpointing": False} if variant == "fp32" else {}
set_seed(42)
records = [json.loads(l) for l in Path(data_file).read_text().splitlines()]
split = Dataset.from_list(records).train_test_split(test_size=0.1, seed=42)
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
evals = []
class Clock(TrainerCallback):
    def on_train_begin(self, *a, **k): self.t0 = time.monotonic()
    def on_evaluate(self, args, state, control, metrics=None, **k):
        evals.append((time.monotonic() - self.t0, metrics["eval_loss"]))
args = SFTConfig(output_dir=out, max_steps=int(steps), per_device_train_batch_size=2,
                 gradient_accumulation_steps=4, learning_rate=2e-4, logging_steps=10,
                 eval_strategy="steps", eval_steps=int(eval_every), save_strategy="no",
                 report_to=[], use_cpu=True, max_length=256, seed=42, disable_tqdm=True,
                 **tuned)
trainer = SFTTrainer(model=model, args=args, train_dataset=split["train"],
                     eval_dataset=split["test"], processing_class=tok, callbacks=[Clock()],
                     peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                            task_type="CAUSAL_LM"))
result = trainer.train()
tokens = max(float(h.get("num_tokens", 0)) for h in trainer.state.log_history)
print("RESULT " + json.dumps({"tokens": tokens, "runtime": result.metrics["train_runtime"],
                              "evals": evals}))
'''


def _ours(model_dir: Path, data_file: Path, steps: int, eval_every: int, out: Path,
          method: str) -> dict:
    from kubetune.trainerconfig import TrainerConfig

    block = {"type": method}
    if method == "QLoRA":
        block["quantization"] = {"computeDtype": "float32"}
    cfg = TrainerConfig.model_validate({
        "model": {"uri": f"file://{model_dir}"},
        "data": {"train": {"uri": f"file://{data_file}"}, "format": "messages",
                 "maxLength": 256, "evalFraction": 0.1},
        "method": block,
        "training": {"maxSteps": steps, "evalSteps": eval_every, "loggingSteps": 10},
        "output": {"uri": f"file://{out}/output"},
        "logging": {"stdout": False, "file": str(out / "events.jsonl"),
                    "termination_log": str(out / "summary.json")},
        "cache_dir": str(out / "cache"), "work_dir": str(out / "work")})
    path = out / "config.yaml"
    path.write_text(cfg.dump())
    return {"config": str(path)}


def _child_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def _run(cmd: list[str]) -> tuple[float, int, str]:
    """Run a child; (wall seconds, its peak RSS in MiB, stdout)."""
    # RUSAGE_CHILDREN is the max over all children so far; run each measured child through a
    # fresh python that reports its own child's peak.
    wrapper = ("import resource, subprocess, sys, time; t=time.monotonic(); "
               "p=subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "sys.stderr.write(p.stderr[-4000:] if p.returncode else ''); "
               "print(p.stdout); print('RSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);"
               "print('WALL', time.monotonic()-t); sys.exit(p.returncode)")
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark run failed: {' '.join(cmd[:4])}\n{proc.stderr}")
    lines = proc.stdout.splitlines()
    rss = int(next(line.split()[1] for line in lines if line.startswith("RSS ")))
    wall = float(next(line.split()[1] for line in lines if line.startswith("WALL ")))
    return wall, rss // 1024, proc.stdout


def _first_time_at(evals: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, loss in evals if loss <= target + 1e-9), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["smollm2", "toy"], default="smollm2")
    parser.add_argument("--steps", type=int, default=None,
                        help="default: 40 on smollm2, 200 on the toy")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="default: 10 on smollm2, 20 on the toy")
    parser.add_argument("--seed", choices=["defaults", "fp32", "both"], default="both",
                        help="seed recipe with TRL's defaults, with bf16 and gradient "
                             "checkpointing off, or both (default)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    real = args.model == "smollm2"
    args.steps = args.steps or (40 if real else 200)
    args.eval_every = args.eval_every or (10 if real else 20)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubetune_trainer import builtin

    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    if real:
        cache = Path.home() / ".cache" / "kubetune" / "run-cache"
        model_dir = builtin.model_path(builtin.SMOLLM2, cache)
        data_file = builtin.write_dataset("reviews", work / "data")
        params = 134_515_008
        print(f"Model: SmolLM2-135M-Instruct ({params / 1e6:.1f}M params), builtin://reviews; "
              f"{args.steps} steps, batch 2 x 4, CPU ({torch.get_num_threads()} threads)")
    else:
        tokenizer = builtin.build_tokenizer()
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=args.hidden,
            intermediate_size=args.hidden * 4, num_hidden_layers=args.layers,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
        model_dir = work / "model"
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        data_file = builtin.write_dataset("tiny-chat", work / "data")
        params = sum(p.numel() for p in model.parameters())
        print(f"Model: Llama hidden {args.hidden}, {args.layers} layers, {params / 1e6:.1f}M "
              f"params; {args.steps} steps, batch 2 x 4, CPU ({torch.get_num_threads()} "
              f"threads)")

    seed_script = work / "seed.py"
    seed_script.write_text(SEED_RECIPE)
    seeds = {}
    for variant in (("defaults", "fp32") if args.seed == "both" else (args.seed,)):
        wall, rss, out = _run([sys.executable, str(seed_script), str(model_dir),
                               str(data_file), str(args.steps), str(args.eval_every),
                               str(work / f"seed-{variant}"), variant])
        seeds[variant] = json.loads(next(l for l in out.splitlines()
                                         if l.startswith("RESULT "))[7:])
        seeds[variant]["rss"] = rss
        seeds[variant]["tps"] = seeds[variant]["tokens"] / seeds[variant]["runtime"]

    results = {}
    for method in ("LoRA", "QLoRA"):
        out_dir = work / method.lower()
        out_dir.mkdir()
        cfg = _ours(model_dir, data_file, args.steps, args.eval_every, out_dir, method)
        wall, rss, _ = _run([sys.executable, "-m", "kubetune_trainer", "train", "--config",
                             cfg["config"]])
        summary = json.loads((out_dir / "summary.json").read_text())
        events = [json.loads(l) for l in (out_dir / "events.jsonl").read_text().splitlines()]
        evals = [(e["elapsed_seconds"], e["eval_loss"]) for e in events
                 if e["event"] == "progress" and e.get("evaluated")]
        results[method] = {"tps": summary["metrics"]["tokensPerSecond"], "rss": rss,
                           "evals": evals, "eval_loss": summary["metrics"].get("evalLoss")}

    baseline = next(iter(seeds))  # the first seed run is the baseline of the ratios
    seed = seeds[baseline]
    target = seed["evals"][-1][1]
    ours = results["LoRA"]
    print(f"{'':30}{'tokens/s':>10}{'ratio':>9}{'t(eval<=' + f'{target:.4f}' + ')':>20}"
          f"{'peak RSS':>12}")
    rows = [(f"seed recipe ({v})", s["tps"], s["evals"], s["rss"]) for v, s in seeds.items()]
    rows += [("kubetune LoRA (defaults)", ours["tps"], ours["evals"], ours["rss"]),
             ("kubetune QLoRA (nf4)", results["QLoRA"]["tps"], results["QLoRA"]["evals"],
              results["QLoRA"]["rss"])]
    for label, tps, evals, rss in rows:
        at = _first_time_at(evals, target)
        print(f"{label:30}{tps:>10.0f}{tps / seed['tps']:>9.2f}"
              f"{(f'{at:.1f}s' if at else 'never'):>20}{rss:>10}MiB")
    for v, s in seeds.items():
        print(f"Throughput ratio ours/seed ({v}): {ours['tps'] / s['tps']:.3f}")
    print(f"Peak RSS QLoRA/LoRA: {results['QLoRA']['rss'] / ours['rss']:.2f}; final eval loss "
          f"LoRA {ours['eval_loss']}, seed ({baseline}) {target:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
