"""FineTuneJobs (and their Kubernetes Events and checkpoints) -> OpenAI's objects (pure).

Nothing is stored besides the FineTuneJob: the job object, its events and checkpoints are
rebuilt from its status on every read, so they can never disagree with `kubectl get`."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Iterable

from .errors import invalid
from .ids import derived
from .jobspec import CANCEL_ANNOTATION, REQUEST_ANNOTATION

# FineTuneJob status.phase -> OpenAI job status (no phase yet: the operator has not judged the
# spec and data, or the first attempt's pod is starting (its first status is written when the
# pod runs, or about 2 s after its Job was created): validating_files)
STATUS = {None: "validating_files", "Pending": "queued", "Queued": "queued",
          "Suspended": "queued", "Running": "running", "Succeeded": "succeeded",
          "Failed": "failed"}
FINISHED = ("succeeded", "failed", "cancelled")


def epoch(timestamp: str | None) -> int | None:
    """RFC 3339 (as the apiserver writes it) -> Unix seconds."""
    if not timestamp:
        return None
    return int(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp())


def request_of(obj: dict[str, Any]) -> dict[str, Any]:
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    try:
        return json.loads(annotations.get(REQUEST_ANNOTATION) or "{}")
    except ValueError:
        return {}


def job_status(obj: dict[str, Any]) -> str:
    """A cancelled job (annotated, then suspended) is `cancelled` unless it had already
    succeeded: the result of a finished run is never hidden."""
    phase = (obj.get("status") or {}).get("phase")
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    if CANCEL_ANNOTATION in annotations and phase != "Succeeded":
        return "cancelled"
    return STATUS.get(phase, "queued")


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return None


def job_error(obj: dict[str, Any]) -> dict[str, Any] | None:
    if job_status(obj) != "failed":
        return None
    failed = condition(obj, "Failed") or {}
    return {"code": failed.get("reason") or "Failed",
            "message": failed.get("message") or "the fine-tuning job failed", "param": None}


def job_object(obj: dict[str, Any], now: float) -> dict[str, Any]:
    """OpenAI's `fine_tuning.job` for a FineTuneJob."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    request, state = request_of(obj), job_status(obj)
    hp = request.get("hyperparameters") or {}
    method = request.get("method") or "supervised"
    annotations = meta.get("annotations") or {}
    finished = epoch(status.get("completionTime")) if state in ("succeeded", "failed") else \
        epoch(annotations.get(CANCEL_ANNOTATION)) if state == "cancelled" else None
    progress = status.get("progress") or {}
    eta = progress.get("etaSeconds") if state == "running" else None
    done = state == "succeeded" and status.get("adapterRef")
    return {"object": "fine_tuning.job", "id": meta.get("name"),
            "model": request.get("model"), "created_at": epoch(meta.get("creationTimestamp")),
            "finished_at": finished, "status": state,
            "fine_tuned_model": request.get("fine_tuned_model") if done else None,
            "organization_id": meta.get("namespace"),
            "training_file": request.get("training_file"),
            "validation_file": request.get("validation_file"),
            "hyperparameters": {k: v for k, v in hp.items() if k != "beta"},
            "method": {"type": method, method: {"hyperparameters": hp}},
            "result_files": [], "trained_tokens": None, "error": job_error(obj),
            "seed": request.get("seed"), "suffix": request.get("suffix"),
            "metadata": request.get("metadata"), "integrations": [],
            "estimated_finish": int(now + eta) if eta is not None else None}


def _event(created: int | None, message: str, level: str = "info", kind: str = "message",
           data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"object": "fine_tuning.job.event", "id": derived("ftevent-", created, message),
            "created_at": created or 0, "level": level, "message": message,
            "type": kind, "data": data or {}}


def job_events(obj: dict[str, Any], kube_events: Iterable[dict[str, Any]]) -> list[dict]:
    """Events, newest first: creation, conditions, attempts, the latest training metrics,
    cancellation, and the Kubernetes Events about the FineTuneJob."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    events = [_event(epoch(meta.get("creationTimestamp")),
                     f"Created fine-tuning job: {meta.get('name')}")]
    for cond in status.get("conditions") or []:
        events.append(_condition_event(cond))
    for attempt in status.get("attempts") or []:
        events.extend(_attempt_events(attempt))
    metrics = _metrics_event(status.get("progress") or {})
    if metrics:
        events.append(metrics)
    cancelled = ((meta.get("annotations") or {}).get(CANCEL_ANNOTATION))
    if cancelled:
        events.append(_event(epoch(cancelled), "Fine-tuning job cancelled"))
    for event in kube_events:
        events.append(_kube_event(event))
    unique = {e["id"]: e for e in events}
    return sorted(unique.values(), key=lambda e: (e["created_at"], e["id"]), reverse=True)


def _condition_event(cond: dict[str, Any]) -> dict[str, Any]:
    bad = cond.get("type") == "Failed" and cond.get("status") == "True"
    text = f"{cond.get('type')}={cond.get('status')}"
    if cond.get("reason"):
        text += f" ({cond['reason']})"
    if cond.get("message"):
        text += f": {cond['message']}"
    return _event(epoch(cond.get("lastTransitionTime")), text, "error" if bad else "info")


def _attempt_events(attempt: dict[str, Any]) -> list[dict[str, Any]]:
    number = attempt.get("number")
    events = []
    if attempt.get("startedAt"):
        resumed = attempt.get("resumedFromStep")
        text = f"Attempt {number} started" + (f", resuming from step {resumed}"
                                              if resumed else "")
        events.append(_event(epoch(attempt["startedAt"]), text))
    if attempt.get("finishedAt"):
        reason = attempt.get("reason") or "ended"
        text = f"Attempt {number} ended: {reason}" + (f": {attempt['message']}"
                                                      if attempt.get("message") else "")
        level = "info" if reason in ("Succeeded", "Suspended") else "warn"
        events.append(_event(epoch(attempt["finishedAt"]), text, level))
    return events


def _metrics_event(progress: dict[str, Any]) -> dict[str, Any] | None:
    if progress.get("step") is None:
        return None
    data = {"step": progress["step"], "total_steps": progress.get("totalSteps"),
            "train_loss": progress.get("loss"), "valid_loss": progress.get("evalLoss"),
            "learning_rate": progress.get("learningRate"), "epoch": progress.get("epoch")}
    data = {k: v for k, v in data.items() if v is not None}
    text = f"Step {progress['step']}/{progress.get('totalSteps', '?')}"
    if progress.get("loss") is not None:
        text += f": training loss={progress['loss']:.4f}"
    return _event(epoch(progress.get("updatedAt")), text, kind="metrics", data=data)


def _kube_event(event: dict[str, Any]) -> dict[str, Any]:
    when = event.get("lastTimestamp") or event.get("eventTime") or \
        event.get("firstTimestamp") or (event.get("metadata") or {}).get("creationTimestamp")
    level = "warn" if event.get("type") == "Warning" else "info"
    return _event(epoch(when), f"{event.get('reason')}: {event.get('message') or ''}".strip(),
                  level)


def job_checkpoints(obj: dict[str, Any], steps: Iterable[tuple[int, int]]) -> list[dict]:
    """Checkpoints, newest first: the complete ones in S3 (`steps`: (step, Unix time)) and,
    for a succeeded job, the final adapter, which is the one servable checkpoint."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    job_id, request = meta.get("name"), request_of(obj)
    model = request.get("fine_tuned_model") or job_id
    out = [_checkpoint(job_id, step, created, f"{model}-step-{step}", {"step": step})
           for step, created in steps]
    metrics = status.get("metrics") or {}
    if job_status(obj) == "succeeded" and status.get("adapterRef"):
        step = metrics.get("steps") or (status.get("progress") or {}).get("step") or 0
        final = {"step": step, "train_loss": metrics.get("trainLoss"),
                 "valid_loss": metrics.get("evalLoss")}
        out = [c for c in out if c["step_number"] != step]
        out.append(_checkpoint(job_id, step, epoch(status.get("completionTime")) or 0, model,
                               {k: v for k, v in final.items() if v is not None}))
    return sorted(out, key=lambda c: (c["step_number"], c["created_at"]), reverse=True)


def _checkpoint(job_id: str, step: int, created: int, name: str,
                metrics: dict[str, Any]) -> dict[str, Any]:
    return {"object": "fine_tuning.job.checkpoint",
            "id": derived("ftckpt_", job_id, step, name), "created_at": created,
            "fine_tuned_model_checkpoint": name, "fine_tuning_job_id": job_id,
            "step_number": step, "metrics": metrics}


def page(items: list[dict[str, Any]], after: str | None, limit: str | None,
         default: int = 20) -> dict[str, Any]:
    """OpenAI's cursor page: items after the one whose id is `after`, at most `limit`."""
    try:
        count = default if limit is None else int(limit)
    except ValueError:
        raise invalid("limit must be an integer", "limit") from None
    if not 1 <= count <= 100:
        raise invalid("limit must be from 1 to 100", "limit")
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise invalid("after names no object of this list", "after")
        start = ids.index(after) + 1
    chosen = items[start:start + count]
    body = {"object": "list", "data": chosen, "has_more": start + count < len(items)}
    if chosen:
        body["first_id"], body["last_id"] = chosen[0]["id"], chosen[-1]["id"]
    return body


def file_object(record: dict[str, Any]) -> dict[str, Any]:
    return {"object": "file", "id": record["id"], "bytes": record["bytes"],
            "created_at": record["created_at"], "filename": record["filename"],
            "purpose": "fine-tune", "status": "processed", "expires_at": None,
            "status_details": None}
