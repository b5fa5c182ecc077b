"""Preemption: SIGTERM saves a checkpoint and a new run resumes from it. Uploads: an upload cut
short by S3 going away leaves no manifest, and a retry completes it."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from trainerutil import events
from kubetune.devcluster import procs, s3
from kubetune import artifacts
from kubetune.storage import Storage, StorageError

pytestmark = pytest.mark.trainer


def _start_training(cfg, tmp_path, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(cfg.dump())
    return subprocess.Popen([sys.executable, "-m", "kubetune_trainer", "train", "--config",
                             str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def test_sigterm_checkpoints_and_rerun_resumes_to_same_total(make_config, tmp_path):
    cfg = make_config({"type": "LoRA", "lora": {"r": 4}}, name="preempt",
                      training={"maxSteps": 300, "loggingSteps": 1},
                      checkpointing={"everySteps": 100, "keepLast": 2})
    proc = _start_training(cfg, tmp_path, "first")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        steps = [e["step"] for e in events(cfg) if e["event"] == "progress"]
        if steps and steps[-1] >= 40:
            break
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail("training never reached step 40")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    first = json.loads(Path(cfg.logging.termination_log).read_text())
    assert first["status"] == "Preempted"
    checkpoint_step = first["checkpointStep"]
    assert 40 <= checkpoint_step < 300
    saved = [e for e in events(cfg) if e["event"] == "checkpoint"]
    assert saved[-1]["step"] == checkpoint_step

    Path(cfg.logging.file).rename(tmp_path / "first-events.jsonl")
    proc = _start_training(cfg, tmp_path, "second")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    second = events(cfg)
    resumed = [e for e in second if e["event"] == "phase" and e["phase"] == "resuming"]
    assert resumed and resumed[0]["step"] == checkpoint_step
    steps = [e["step"] for e in second if e["event"] == "progress"]
    assert min(steps) > checkpoint_step  # no step before the checkpoint was trained again
    done = json.loads(Path(cfg.logging.termination_log).read_text())
    assert done["status"] == "Succeeded"
    assert done["metrics"]["steps"] == 300


@pytest.mark.parametrize("strategy", ["steps", "epoch"])
def test_sigterm_saves_before_any_evaluation(make_config, tmp_path, strategy):
    """The Trainer evaluates before it saves, and at the end of an epoch after the loop
    stops: a SIGTERM on an evaluation step must checkpoint and stop with no evaluation on
    the way out (it would eat the pod's grace period). Real transformers callbacks, in the
    Trainer's order (its DefaultFlowCallback first)."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import (CallbackHandler, DefaultFlowCallback,
                                               TrainerControl, TrainerState)

    from kubetune_trainer.checkpoints import Preemption, make_callback

    cfg = make_config({"type": "LoRA"}, name="grace", checkpointing={"everySteps": 1000})
    args = TrainingArguments(output_dir=str(tmp_path / "out"), eval_strategy=strategy,
                             eval_steps=5, save_strategy="no", report_to=[])
    preemption = Preemption()
    ours = make_callback(cfg, None, preemption, is_main=False)
    handler = CallbackHandler([DefaultFlowCallback(), ours], None, None, None, None)
    state, control = TrainerState(max_steps=100, global_step=5, eval_steps=5), TrainerControl()
    control = handler.on_step_end(args, state, control)
    assert control.should_evaluate is (strategy == "steps")  # the hook is live, not preempted
    assert not control.should_save and not control.should_training_stop

    control, state.global_step = TrainerControl(), 10
    preemption.requested = True
    control = handler.on_step_end(args, state, control)
    assert control.should_save and control.should_training_stop
    assert not control.should_evaluate
    control = handler.on_epoch_end(args, state, control)  # the loop ends the epoch
    assert not control.should_evaluate and ours.preempted_at == 10

    # SIGTERM after the epoch's last step: the epoch end checkpoints instead of evaluating.
    late = make_callback(cfg, None, preemption, is_main=False)
    handler = CallbackHandler([DefaultFlowCallback(), late], None, None, None, None)
    control = handler.on_epoch_end(args, TrainerState(max_steps=100, global_step=12,
                                                      eval_steps=5),
                                   TrainerControl())
    assert control.should_save and control.should_training_stop
    assert not control.should_evaluate and late.preempted_at == 12


def test_incomplete_checkpoint_is_never_resumed(make_config, tmp_path):
    from kubetune_trainer.checkpoints import Checkpoints
    from kubetune_trainer.progress import Reporter

    cfg = make_config({"type": "LoRA"}, name="markers")
    storage = Storage()
    ckpt = Checkpoints(cfg, storage, Reporter(cfg.logging))
    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "trainer_state.json").write_text("{}")
    ckpt.upload(local, 10)
    # A later checkpoint whose upload was cut short: files but no marker.
    storage.put_file(local / "trainer_state.json", ckpt.uri(20) + "/trainer_state.json")
    assert ckpt.complete_steps() == [10]
    step, path = ckpt.latest(tmp_path / "resume")
    assert step == 10 and (path / "trainer_state.json").exists()


def test_upload_interrupted_by_s3_stop_leaves_no_manifest_then_retry_completes(tmp_path,
                                                                              monkeypatch):
    server_dir = tmp_path / "s3"
    proc, info = s3.start(server_dir)
    try:
        for key, value in info.env().items():
            monkeypatch.setenv(key, value)
        artifact = tmp_path / "artifact"
        artifact.mkdir()
        (artifact / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
        (artifact / "adapter_model.safetensors").write_bytes(os.urandom(64 * 1024 * 1024))
        manifest = artifacts.build_manifest(artifact, kind="adapter", method={"type": "LoRA"},
                                            base_model={"uri": "builtin://tiny-llama"},
                                            dataset=None, metrics={})
        uri = f"s3://{info.bucket}/interrupted/adapter"
        storage = Storage(retries=2)
        errors = []

        def upload():
            try:
                artifacts.upload(artifact, manifest, uri, storage)
            except StorageError as exc:
                errors.append(exc)

        thread = threading.Thread(target=upload)
        thread.start()
        # Stop S3 once the first (small) file is in and the big one is under way.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
                u.endswith("adapter_config.json") for u, _ in _list(storage, uri)):
            time.sleep(0.01)
        procs.stop(proc, grace=0)
        thread.join(timeout=300)
        assert errors, "the upload should have failed with S3 gone"
        assert "unreachable" in str(errors[0]) or "S3" in str(errors[0])

        proc, info = s3.start(server_dir)  # same data, credentials and port
        listed = [u for u, _ in storage.list(uri)]
        assert not any(u.endswith("manifest.json") for u in listed), listed
        with pytest.raises(artifacts.VerificationError, match="no manifest.json"):
            artifacts.verify(uri, storage)

        digest = artifacts.upload(artifact, manifest, uri, Storage())
        got, verified = artifacts.verify(uri, Storage(), tmp_path / "back")
        assert verified == digest
        assert got["files"]["adapter_model.safetensors"]["size"] == 64 * 1024 * 1024
    finally:
        procs.stop(proc)


def _list(storage, uri):
    try:
        return storage.list(uri)
    except StorageError:
        return []
