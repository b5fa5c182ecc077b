"""The seed's method table, measured: `kubetune compare` on a FineTuneJob (default: the
quickstart, SmolLM2-135M-Instruct on the built-in reviews task) with every method, then each
method's task score as a ratio of full fine-tuning's, measured in the same run, against the
goals (LoRA >= 90 %, QLoRA >= 85 %, IA3 and prefix tuning >= 80 %, adapters >= 85 %).

    python bench/methods_table.py [--job examples/finetunejob-lora.yaml] [--output DIR]
                                  [--methods ...] [--max-steps N]

About 30 minutes on two CPU cores; minutes on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOALS = {"LoRA": 0.90, "DoRA": 0.90, "QLoRA": 0.85, "IA3": 0.80, "PrefixTuning": 0.80,
         "Adapter": 0.85}


def main() -> int:
    from kubetune_trainer.compare import METHODS, compare, table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--job", type=Path, default=ROOT / "examples/finetunejob-lora.yaml")
    parser.add_argument("--output", type=Path, default=Path("bench-methods"))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--max-samples", type=int, default=None)
    args = parser.parse_args()
    records = compare(args.job, args.methods.split(","), args.output, None, args.max_steps,
                      args.max_samples)
    print(table(records))
    full = next((r.get("score") for r in records if r["method"] == "Full"), None)
    if not full:
        print("\nno full fine-tuning score to compare with", file=sys.stderr)
        return 1
    print(f"\nScore relative to full fine-tuning ({full:.3f}), same run:")
    verdicts = {}
    for r in records:
        if r["method"] in GOALS:
            ratio = (r.get("score") or 0) / full
            ok = ratio >= GOALS[r["method"]]
            verdicts[r["method"]] = {"ratio": round(ratio, 3), "goal": GOALS[r["method"]],
                                     "met": ok}
            print(f"  {r['method']:<13} {ratio:6.1%}  (goal {GOALS[r['method']]:.0%}) "
                  f"{'met' if ok else 'NOT met'}")
    (args.output / "goals.json").write_text(json.dumps(verdicts, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
