"""Progress events: one JSON object per logging step, plus phase events and a final summary.

Sinks: stdout (one JSON line each), a JSONL file, and the FineTuneJob's status (a merge patch of
``status.progress`` with the pod's service-account token: no Kubernetes client library, RBAC
narrowed to ``finetunejobs/status`` patch). The summary goes to the container's termination
message, where the operator reads it even if the status patch was never allowed.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from kubetune.contract import TerminationSummary
from kubetune.trainerconfig import LoggingConfig

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class StatusPatcher:
    """PATCH /apis/kubetune.io/v1alpha1/namespaces/NS/finetunejobs/NAME/status."""

    def __init__(self, namespace: str, name: str, min_interval: float):
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        self.enabled = bool(host) and (SA_DIR / "token").exists()
        self.url = (f"https://{host}:{port}/apis/kubetune.io/v1alpha1/namespaces/{namespace}/"
                    f"finetunejobs/{name}/status")
        self.min_interval = min_interval
        self.last = 0.0
        self.failures = 0
        if self.enabled:
            ca = SA_DIR / "ca.crt"
            self.ctx = ssl.create_default_context(cafile=str(ca) if ca.exists() else None)

    def send(self, progress: dict, force: bool = False) -> None:
        if not self.enabled or self.failures >= 5:
            return
        if not force and time.monotonic() - self.last < self.min_interval:
            return
        self.last = time.monotonic()
        self.patch({"progress": progress})

    def patch(self, status: dict) -> None:
        """One merge patch of the status (best effort, 5 s)."""
        if not self.enabled or self.failures >= 5:
            return
        body = json.dumps({"status": status}).encode()
        request = urllib.request.Request(self.url, data=body, method="PATCH", headers={
            "Content-Type": "application/merge-patch+json",
            "Authorization": f"Bearer {(SA_DIR / 'token').read_text().strip()}"})
        try:
            with urllib.request.urlopen(request, context=self.ctx, timeout=5):
                self.failures = 0
        except Exception as exc:  # noqa: BLE001 - progress is best effort; training goes on
            self.failures += 1
            print(json.dumps({"event": "warning", "message": f"status patch failed: {exc}"}),
                  file=sys.stderr, flush=True)


class Reporter:
    def __init__(self, cfg: LoggingConfig, rank: int = 0):
        self.cfg = cfg
        self.rank = rank
        self.file = Path(cfg.file) if cfg.file else None
        self.status = (StatusPatcher(cfg.status.namespace, cfg.status.name,
                                     cfg.status.min_interval_seconds) if cfg.status else None)
        self.listeners: list = []

    def emit(self, event: dict) -> None:
        if self.rank != 0:
            return
        event = {"time": _now(), **event}
        line = json.dumps(event, sort_keys=True)
        if self.cfg.stdout:
            print(line, flush=True)
        if self.file:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.file, "a") as out:
                out.write(line + "\n")
        for listener in self.listeners:
            listener(event)
        if self.status and event["event"] == "progress":
            self.status.send(to_status_progress(event), force=event.get("final", False))

    def phase(self, phase: str, **fields) -> None:
        self.emit({"event": "phase", "phase": phase, **fields})

    def summary(self, summary: dict) -> None:
        """The final summary: an event, and the container's termination message (<4 KiB)."""
        self.emit({"event": "summary", **summary})
        if self.rank != 0:
            return
        text = TerminationSummary.model_validate(summary).render()  # fits, and parses
        try:
            Path(self.cfg.termination_log).write_text(text)
        except OSError:
            pass  # not in a container (kubetune run): the summary event is enough


def to_status_progress(event: dict) -> dict:
    keys = {"step": "step", "total_steps": "totalSteps", "epoch": "epoch", "percent": "percent",
            "loss": "loss", "eval_loss": "evalLoss", "learning_rate": "learningRate",
            "tokens_per_second": "tokensPerSecond", "eta_seconds": "etaSeconds",
            "reward_margin": "rewardMargin", "reward_accuracy": "rewardAccuracy",
            "time": "updatedAt"}
    return {keys[k]: v for k, v in event.items() if k in keys and v is not None}


# DPO logs (TRL's DPOTrainer): the implicit reward's chosen-over-rejected margin and how often
# it is positive, on the training batches and (prefixed eval_) on the eval pass.
PREFERENCE_LOGS = {"rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy",
                   "eval_rewards/margins": "eval_reward_margin",
                   "eval_rewards/accuracies": "eval_reward_accuracy"}


def preference_fields(logs: dict) -> dict:
    """The preference metrics in one Trainer log, under our event names (none for SFT)."""
    return {name: round(float(logs[key]), 6) for key, name in PREFERENCE_LOGS.items()
            if key in logs}


def make_callback(reporter: Reporter):
    """A transformers TrainerCallback turning Trainer logs into progress events."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def __init__(self):
            self.start = None
            self.start_step = 0
            self.last_time = None
            self.last_tokens = 0.0
            self.tokens_per_second = None
            self.eval_loss = None
            self.preference: dict = {}
            self.train_losses: list[tuple[int, float]] = []
            self.eval_losses: list[tuple[int, float]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = self.last_time = time.monotonic()
            self.start_step = state.global_step

        def on_train_end(self, args, state, control, **kwargs):
            last = self.train_losses[-1][1] if self.train_losses else None
            reporter.emit({"event": "progress", "step": state.global_step,
                           "total_steps": state.max_steps, "epoch": round(float(state.epoch or 0), 4),
                           "percent": round(100.0 * state.global_step / max(state.max_steps, 1), 2),
                           "loss": last, "eval_loss": self.eval_loss, "eta_seconds": 0,
                           "tokens_per_second": round(self.tokens_per_second, 1)
                           if self.tokens_per_second else None, "final": True,
                           **self.preference})

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            now = time.monotonic()
            if "eval_loss" in logs:
                self.eval_loss = float(logs["eval_loss"])
                self.eval_losses.append((state.global_step, self.eval_loss))
            tokens = logs.get("num_tokens")
            if tokens is not None:
                tokens = float(tokens)
                elapsed = now - self.last_time
                if elapsed > 0 and tokens > self.last_tokens:
                    self.tokens_per_second = (tokens - self.last_tokens) / elapsed
                self.last_tokens, self.last_time = tokens, now
            if "loss" not in logs and "eval_loss" not in logs:
                return
            self.preference.update(preference_fields(logs))
            if "loss" in logs:
                self.train_losses.append((state.global_step, float(logs["loss"])))
            done = state.global_step - self.start_step
            remaining = max(state.max_steps - state.global_step, 0)
            eta = int((now - self.start) / done * remaining) if done > 0 else None
            reporter.emit({
                "event": "progress", "step": state.global_step, "total_steps": state.max_steps,
                "epoch": round(float(state.epoch or 0), 4),
                "percent": round(100.0 * state.global_step / max(state.max_steps, 1), 2),
                "loss": float(logs["loss"]) if "loss" in logs else None,
                "eval_loss": self.eval_loss,
                "learning_rate": float(logs["learning_rate"]) if "learning_rate" in logs else None,
                "tokens_per_second": round(self.tokens_per_second, 1)
                if self.tokens_per_second else None,
                "eta_seconds": eta, "peak_memory_bytes": peak_memory(),
                "evaluated": "eval_loss" in logs,
                "elapsed_seconds": round(now - self.start, 3), **self.preference})

    return ProgressCallback()


def peak_memory() -> int:
    """Peak GPU memory if training on a GPU, else the process's peak RSS."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
            return int(torch.cuda.max_memory_allocated())
    except Exception:  # noqa: BLE001
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
