"""`kubetune run` on an example, and multi-process (DDP, gloo) training through torchrun."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainerutil import events, summary

pytestmark = pytest.mark.trainer
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(1800)
def test_quickstart_fine_tunes_the_real_model_and_shows_before_and_after(tmp_path):
    """The quickstart's command: SmolLM2-135M-Instruct + LoRA on the reviews task, quietly."""
    proc = subprocess.run([sys.executable, "-m", "kubetune.cli", "run",
                           str(ROOT / "examples/finetunejob-lora.yaml"), "--runs-dir",
                           str(tmp_path)],
                          capture_output=True, text=True, timeout=1200, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "quickstart-lora"
    result = json.loads((run / "summary.json").read_text())
    assert result["status"] == "Succeeded" and result["metrics"]["steps"] == 24
    metrics = result["metrics"]
    assert metrics["scoreSamples"] == 60
    assert metrics["baseNormalizedMatch"] <= 0.25 and metrics["normalizedMatch"] >= 0.8, metrics
    manifest = json.loads((run / "output/adapter/manifest.json").read_text())
    assert manifest["metrics"]["normalizedMatch"] == metrics["normalizedMatch"]
    assert manifest["baseModel"]["uri"] == "builtin://smollm2-135m-instruct"
    png = (run / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    err = proc.stderr
    assert "step 24/24" in err and "Loss curve:" in err
    assert "No S3 credentials in the environment" in err
    assert f"base {metrics['baseNormalizedMatch']:.2f} -> fine-tuned " \
           f"{metrics['normalizedMatch']:.2f}" in err
    assert err.count("  base:       ") == 5 and err.count("  fine-tuned: ") == 5
    # A newcomer sees our lines, not third-party noise.
    for noise in ("FutureWarning", "UserWarning", "Loading weights", "Converting and "
                  "de-quantizing", "Map:", "Tokenizing", "kernels"):
        assert noise not in err, noise


def test_kubetune_run_rejects_an_invalid_manifest_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "examples/finetunejob-lora.yaml").read_text().replace("r: 16", "r: -1"))
    proc = subprocess.run([sys.executable, "-m", "kubetune.cli", "run", str(bad)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("kubetune: error:")
    assert "spec.method.lora.r" in proc.stderr


def test_torchrun_two_processes_gloo(make_config, tmp_path):
    cfg = make_config({"type": "LoRA", "lora": {"r": 4}}, training={"maxSteps": 12},
                      name="ddp")
    path = tmp_path / "ddp.yaml"
    path.write_text(cfg.dump())
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m",
                           "kubetune_trainer", "train", "--config", str(path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = [e for e in events(cfg) if e["event"] == "model"]
    assert len(model) == 1 and model[0]["world_size"] == 2  # only rank 0 reports
    result = summary(cfg)
    assert result["status"] == "Succeeded" and result["metrics"]["steps"] == 12
    # Each rank saw half of every global batch: 12 steps x 8 x 2 sequences = 192 of 400.
    last = [e for e in events(cfg) if e["event"] == "progress"][-1]
    assert last["epoch"] == pytest.approx(12 * 8 * 2 / 400, rel=0.1)
