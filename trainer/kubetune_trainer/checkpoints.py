"""Checkpoints in the output location, for resumption after preemption or failure.

A checkpoint is the Trainer's own folder (adapter, optimizer, scheduler, RNG and trainer state)
uploaded to ``<output>/checkpoints/step-NNNNNNNN/``; its ``COMPLETE`` marker is written last,
so a checkpoint without a marker (an upload cut short) is never resumed from. Saves happen every
N steps and/or minutes and on SIGTERM (preemption); older complete checkpoints beyond keepLast
are pruned after a newer one is complete.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

from kubetune.trainerconfig import TrainerConfig
from kubetune import safepath
from kubetune.storage import Location, Storage, StorageError, join

MARKER = "COMPLETE"
_STEP = re.compile(r"step-(\d+)/")


class Checkpoints:
    def __init__(self, cfg: TrainerConfig, storage: Storage, reporter):
        self.cfg = cfg
        self.storage = storage
        self.reporter = reporter
        self.root = cfg.output.checkpoints_uri

    def uri(self, step: int) -> str:
        return join(self.root, f"step-{step:08d}")

    def complete_steps(self) -> list[int]:
        steps = set()
        for uri, _ in self.storage.list(self.root):
            if uri.endswith("/" + MARKER):
                match = _STEP.search(uri)
                if match:
                    steps.add(int(match.group(1)))
        return sorted(steps)

    def upload(self, local: Path, step: int) -> None:
        target = self.uri(step)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        for path in files:
            self.storage.put_file(path, join(target, str(path.relative_to(local))))
        self.storage.put_bytes(json.dumps({"step": step, "files": len(files)}).encode(),
                               join(target, MARKER))
        self.reporter.emit({"event": "checkpoint", "step": step, "uri": target})
        self.prune()

    def prune(self) -> None:
        steps = self.complete_steps()
        for old in steps[:-self.cfg.checkpointing.keep_last]:
            # Marker first: a half-deleted checkpoint must never look complete.
            self._delete(join(self.uri(old), MARKER))
            self.storage.delete_prefix(self.uri(old))

    def _delete(self, uri: str) -> None:
        loc = Location.parse(uri)
        if loc.scheme == "file":
            Path(loc.key).unlink(missing_ok=True)
        else:
            self.storage.s3.delete_object(Bucket=loc.bucket, Key=loc.key)

    def latest(self, dest: Path) -> tuple[int, Path] | None:
        """Download the latest complete checkpoint; None when there is none."""
        steps = self.complete_steps()
        if not steps:
            return None
        step = steps[-1]
        target = dest / f"checkpoint-{step}"
        prefix = self.uri(step)
        for uri, size in self.storage.list(prefix):
            rel = uri[len(prefix) + 1:]
            if rel != MARKER:
                try:
                    local = safepath.join(target, rel)
                except safepath.UnsafePath as exc:
                    raise StorageError(f"{uri}: refused: {exc}") from None
                self.storage.get_file(uri, local, size)
        return step, target


class Preemption:
    """Turns SIGTERM into "checkpoint now, then stop"."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def install(self) -> None:
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):  # noqa: ARG002
        self.requested = True

    def uninstall(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def make_callback(cfg: TrainerConfig, checkpoints: Checkpoints, preemption: Preemption,
                  is_main: bool):
    from transformers import TrainerCallback

    every_steps = cfg.checkpointing.every_steps
    every_seconds = (cfg.checkpointing.every_minutes or 0) * 60

    class CheckpointCallback(TrainerCallback):
        def __init__(self):
            self.last_save = time.monotonic()
            self.preempted_at: int | None = None

        def on_step_end(self, args, state, control, **kwargs):
            due = (every_steps and state.global_step % every_steps == 0) or (
                every_seconds and time.monotonic() - self.last_save >= every_seconds)
            if preemption.requested:
                self._stop(state, control)
            elif due and state.global_step < state.max_steps:
                control.should_save = True
            return control

        def on_epoch_end(self, args, state, control, **kwargs):
            # The epoch's evaluation (eval_strategy "epoch") would run after the loop stops
            # and before the process exits, inside the grace period the checkpoint needs.
            if preemption.requested:
                self._stop(state, control)
            return control

        def _stop(self, state, control) -> None:
            """Checkpoint at this step (once), stop, and evaluate nothing on the way out: the
            Trainer evaluates before it saves, and the pod's grace period is for the save."""
            if self.preempted_at is None:
                self.preempted_at = state.global_step
                control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False

        def on_save(self, args, state, control, **kwargs):
            self.last_save = time.monotonic()
            if is_main:
                local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if local.exists():
                    checkpoints.upload(local, state.global_step)

    return CheckpointCallback()
