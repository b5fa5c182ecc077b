"""The trainer ↔ operator contract: exit codes and the termination summary.

The trainer ends every attempt with an exit code and a JSON summary in the container's
termination message (at most 4096 bytes: the kubelet truncates longer ones, which would leave
JSON that does not parse). The operator reads both to classify the attempt. Both sides import
this module, so neither can drift from the other.
"""

from __future__ import annotations

import json
from enum import IntEnum
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

MAX_MESSAGE_BYTES = 4096  # the kubelet's limit for one container's termination message
MAX_TEXT = 2000


class ExitCode(IntEnum):
    OK = 0
    """Succeeded: the artifact is uploaded and its manifest written."""
    FAILED = 1
    """Failed in a way a retry may fix (storage, a crash, out of memory): counted, retried."""
    INVALID = 2
    """Invalid input (data, model, settings): never retried (the Job's podFailurePolicy)."""
    PREEMPTED = 143
    """Stopped by SIGTERM after saving a checkpoint (preemption, suspension): not counted."""


Status = Literal["Succeeded", "Failed", "Preempted", "Unknown"]
# Failure reasons the trainer writes (the operator maps them to condition reasons).
TRAINER_REASONS = ("InvalidInput", "StorageError", "OOMKilled", "Error", "Preempted")


class TerminationSummary(BaseModel):
    """What the trainer says about how an attempt ended."""

    model_config = ConfigDict(extra="ignore")

    status: Status = "Unknown"
    """How the attempt ended."""
    reason: Optional[str] = None
    """CamelCase cause of a failure (TRAINER_REASONS) or of a stop."""
    message: Optional[str] = None
    """One human line (bounded)."""
    metrics: Optional[dict] = None
    """Final metrics (loss, steps, task score, resumedFromStep, …)."""
    artifact: Optional[dict] = None
    """The published adapter: uri, manifestSha256, method, rank, sizeBytes."""
    merged: Optional[dict] = None
    """The published merged model, when one was asked for."""
    checkpointStep: Optional[int] = None  # noqa: N815 - the wire name
    """The step of the checkpoint saved before a preemption."""
    tracking: Optional[dict] = None
    """The experiment-tracking run: runId, experimentId, url, state, message."""

    @field_validator("reason", "message", mode="before")
    @classmethod
    def _text(cls, value):
        return value[-MAX_TEXT:] if isinstance(value, str) else None

    @field_validator("metrics", "artifact", "merged", "tracking", mode="before")
    @classmethod
    def _object(cls, value):
        return value if isinstance(value, dict) else None

    @field_validator("checkpointStep", mode="before")
    @classmethod
    def _int(cls, value):
        return value if type(value) is int else None

    @field_validator("status", mode="before")
    @classmethod
    def _status(cls, value):
        return value if value in ("Succeeded", "Failed", "Preempted") else "Unknown"

    # ---- the wire ----------------------------------------------------------------------------
    def render(self) -> str:
        """JSON that fits the termination message: metrics are dropped largest first, then
        the message shortened, before anything would be cut mid-JSON."""
        data = self.model_dump(exclude_none=True)
        text = json.dumps(data, sort_keys=True)
        metrics = dict(data.get("metrics") or {})
        while len(text.encode()) > MAX_MESSAGE_BYTES and metrics:
            del metrics[max(metrics, key=lambda k: len(json.dumps(metrics[k])))]
            data["metrics"] = metrics
            text = json.dumps(data, sort_keys=True)
        while len(text.encode()) > MAX_MESSAGE_BYTES and data.get("message"):
            data["message"] = data["message"][: len(data["message"]) // 2]
            text = json.dumps(data, sort_keys=True)
        return text

    @classmethod
    def parse(cls, text: str | None) -> "TerminationSummary | None":
        """The summary in a termination message written by the container: any text at all.
        None for no message; status Unknown (with the text) for one that is not a summary."""
        if not text:
            return None
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return cls(status="Unknown", message=str(text))
        try:
            return cls.model_validate(data)
        except ValidationError:
            return cls(status="Unknown", message=str(text))

    def as_dict(self) -> dict:
        return self.model_dump(exclude_none=True)
