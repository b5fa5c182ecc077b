"""FineTuneJob reconcile, pure: spec + observed children + verification results + now →
children to create or change, the status rebuilt from that world, Events, and when to look again.

No I/O and no clock reads here; the controller gathers the world and applies the plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from kubetune.api.finetunejob import FineTuneJob
from kubetune.contract import ExitCode, TerminationSummary

from .. import conditions as cond
from ..resources import finetunejob as res
from ..settings import OperatorSettings

MAX_ATTEMPTS_IN_STATUS = 20
DISRUPTION_REASONS = {"PreemptionByScheduler": "Preempted", "PreemptionByKubeScheduler": "Preempted",
                      "EvictionByEvictionAPI": "Evicted", "DeletionByTaintManager": "NodeLost",
                      "DeletionByPodGC": "NodeLost", "TerminationByKubelet": "Evicted"}


@dataclass
class Attempt:
    number: int
    job_name: str
    state: str  # Pending | Unschedulable | Running | Suspended | Queued | Succeeded | Failed
    reason: str = ""
    message: str = ""
    counts: bool = False  # against retryPolicy.maxRetries
    terminal: bool = False  # no further attempt can help
    started: str | None = None
    finished: str | None = None
    summary: dict | None = None  # the trainer's termination message

    def status(self) -> dict:
        out = {"number": self.number, "jobName": self.job_name,
               "reason": self.reason or self.state, "startedAt": self.started}
        if self.message:
            out["message"] = self.message[:4000]
        if self.state in ("Succeeded", "Failed"):
            out["countsAgainstRetries"] = self.counts
            out["finishedAt"] = self.finished
        resumed = (self.summary or {}).get("metrics", {}).get("resumedFromStep")
        if resumed:
            out["resumedFromStep"] = resumed
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class Plan:
    create: list[dict] = field(default_factory=list)
    patches: list[tuple[dict, dict]] = field(default_factory=list)  # (object, merge patch)
    delete_self: bool = False
    status: dict = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    requeue_after: float | None = None
    verify_attempt: Attempt | None = None  # a succeeded attempt whose artifact needs checking


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.strptime(value[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)


def _ts(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def _job_conditions(job: dict) -> dict[str, dict]:
    return {c["type"]: c for c in (job.get("status") or {}).get("conditions") or []
            if c.get("status") == "True"}


def _trainer_state(pod: dict) -> dict:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == "trainer":
            return status.get("state") or {}
    return {}


def _summary(pods: list[dict]) -> dict | None:
    """The newest trainer termination message, typed and bounded (kubetune.contract)."""
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "",
                      reverse=True):
        summary = TerminationSummary.parse(
            (_trainer_state(pod).get("terminated") or {}).get("message"))
        if summary is not None:
            return summary.as_dict()
    return None


def classify(job: dict, pods: list[dict]) -> Attempt:
    """What one attempt's Job and pods say about it."""
    meta = job["metadata"]
    number = int(meta["labels"][res.LABEL_ATTEMPT])
    conds = _job_conditions(job)
    status = job.get("status") or {}
    attempt = Attempt(number=number, job_name=meta["name"], state="Pending",
                      started=meta.get("creationTimestamp"))
    summary = _summary(pods)
    attempt.summary = summary
    if "Complete" in conds:
        attempt.state, attempt.reason = "Succeeded", "Succeeded"
        attempt.finished = status.get("completionTime") or conds["Complete"].get(
            "lastTransitionTime")
        return attempt
    if "Failed" in conds:
        failed = conds["Failed"]
        attempt.state = "Failed"
        attempt.finished = failed.get("lastTransitionTime")
        message = failed.get("message", "")
        disruption = next((c for p in pods for c in (p.get("status") or {}).get("conditions") or []
                           if c.get("type") == "DisruptionTarget" and c.get("status") == "True"),
                          None)
        exit_codes = [(_trainer_state(p).get("terminated") or {}).get("exitCode") for p in pods]
        oom = any((_trainer_state(p).get("terminated") or {}).get("reason") == "OOMKilled"
                  for p in pods)
        if failed.get("reason") == "DeadlineExceeded":
            attempt.reason, attempt.terminal = "DeadlineExceeded", True
            attempt.message = f"attempt exceeded activeDeadlineSeconds: {message}"
        elif disruption is not None or "DisruptionTarget" in message:
            kind = DISRUPTION_REASONS.get((disruption or {}).get("reason", ""), "Preempted")
            attempt.reason = kind
            attempt.message = (disruption or {}).get("message") or message
        elif ExitCode.INVALID in exit_codes or (summary or {}).get("reason") == \
                "InvalidInput":
            attempt.reason, attempt.terminal = "InvalidSpec", True
            attempt.message = (summary or {}).get("message") or message
        elif (summary or {}).get("status") == "Preempted":
            attempt.reason = "Preempted"  # stopped by SIGTERM after a checkpoint
            attempt.message = (summary or {}).get("message", "")
        elif oom or (summary or {}).get("reason") == "OOMKilled":
            attempt.reason, attempt.counts = "OOMKilled", True
            attempt.message = (summary or {}).get("message") or "the trainer ran out of memory"
        else:
            attempt.reason, attempt.counts = "Error", True
            code = next((c for c in exit_codes if c), None)
            attempt.message = (summary or {}).get("message") or \
                f"trainer exited with code {code}: {message}"
        return attempt
    spec = job.get("spec") or {}
    if spec.get("suspend"):
        queued = res.KUEUE_QUEUE in (meta.get("labels") or {})
        attempt.state = "Suspended"
        attempt.reason = "Suspended"
        attempt.message = "queued in Kueue" if queued else "suspended"
        attempt.summary = {"queued": queued}
        return attempt
    for pod in pods:
        phase = (pod.get("status") or {}).get("phase")
        if phase == "Succeeded":  # the Job controller has not marked the Job Complete yet
            attempt.state, attempt.reason = "Running", "Completing"
            attempt.message = f"pod {pod['metadata']['name']} finished; completing"
            return attempt
        if phase == "Running":
            attempt.state, attempt.reason = "Running", "Running"
            attempt.message = f"pod {pod['metadata']['name']} on {pod['spec'].get('nodeName')}"
            return attempt
    for pod in pods:
        for c in (pod.get("status") or {}).get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("reason") == "Unschedulable":
                attempt.state, attempt.reason = "Unschedulable", "Unschedulable"
                attempt.message = c.get("message", "")
                return attempt
    attempt.reason = "Pending"
    attempt.message = "waiting for the trainer pod" if not pods else \
        f"pod {pods[0]['metadata']['name']} is {pods[0].get('status', {}).get('phase', 'Pending')}"
    return attempt


def semantic_errors(body: dict) -> list[str]:
    """What only the operator can judge (the schema and CEL cannot)."""
    errors = []
    if len(body["metadata"]["name"]) > res.MAX_NAME:
        errors.append(f"metadata.name: at most {res.MAX_NAME} characters (the trainer Job and "
                      f"its pods are named after it)")
    return errors


def _backoff(job: FineTuneJob, retries: int, settings: OperatorSettings) -> float:
    base = settings.retry_base_seconds if settings.retry_base_seconds is not None else \
        job.spec.retry_policy.backoff_seconds
    return float(min(base * (2 ** max(retries - 1, 0)), job.spec.retry_policy.max_backoff_seconds))


def reconcile(body: dict, job: FineTuneJob | None, spec_errors: list[str], jobs: list[dict],
              pods: list[dict], artifact: dict | None, artifact_error: str | None,
              adapter: dict | None, settings: OperatorSettings, now: datetime) -> Plan:
    plan = Plan()
    meta = body["metadata"]
    generation = meta.get("generation")
    old = body.get("status") or {}
    conditions = [dict(c) for c in old.get("conditions") or []]
    status: dict = {"observedGeneration": generation}

    def setc(kind, ok, reason, message):
        cond.set_condition(conditions, kind, ok, reason, message, generation, now)

    if spec_errors or job is None:
        message = "; ".join(spec_errors)
        for kind in ("Running", "Succeeded", "Suspended", "ArtifactPublished"):
            setc(kind, False, "InvalidSpec", message)
        setc("Failed", True, "InvalidSpec", message)
        setc("Ready", False, "InvalidSpec", message)
        status.update(phase="Failed", conditions=conditions,
                      completionTime=old.get("completionTime") or _ts(now))
        plan.status = status
        if job is not None:
            _expire(plan, job, status, now)
        _transition_events(plan, old, status, message)
        return plan

    by_attempt: dict[int, Attempt] = {}
    for j in jobs:
        number = int(j["metadata"]["labels"][res.LABEL_ATTEMPT])
        job_pods = [p for p in pods if (p["metadata"].get("labels") or {}).get(
            "batch.kubernetes.io/job-name", (p["metadata"].get("labels") or {}).get("job-name"))
            == j["metadata"]["name"]]
        by_attempt[number] = classify(j, job_pods)
    # Attempts whose Job is gone (TTL cleanup) survive in status.
    history = {a["number"]: a for a in old.get("attempts") or []}
    attempts = [by_attempt[n].status() if n in by_attempt else history[n]
                for n in sorted(set(by_attempt) | set(history))][-MAX_ATTEMPTS_IN_STATUS:]
    retries = sum(1 for a in attempts if a.get("countsAgainstRetries"))
    current = by_attempt[max(by_attempt)] if by_attempt else None
    spec = job.spec
    suspend_wanted = spec.scheduling.suspend
    status["attempts"] = attempts
    status["retries"] = retries
    status["startTime"] = old.get("startTime") or (current.started if current else None)

    # Children that every attempt needs (idempotent: 409 on repeat).
    base_children = [res.config_map(job, body, settings), *res.rbac(body)]

    def new_attempt(number: int) -> None:
        plan.create.extend(base_children)
        initial_suspend = suspend_wanted or bool(spec.scheduling.queue_name)
        if spec.resources.nodes > 1:
            plan.create.append(res.headless_service(body, number))
        plan.create.append(res.training_job(job, body, number, settings, initial_suspend))
        plan.events.append(("Normal", "CreatedJob",
                            f"Created Job {res.job_name(meta['name'], number)} (attempt {number})"))
        status["jobName"] = res.job_name(meta["name"], number)
        status["startTime"] = status["startTime"] or _ts(now)

    terminal_reason = None
    terminal_message = ""
    phase = "Pending"
    if current is None:
        new_attempt(0)
        phase = "Queued" if (spec.scheduling.queue_name and not suspend_wanted) else \
            ("Suspended" if suspend_wanted else "Pending")
        setc("Running", False, "Created", "created the first attempt")
        setc("Ready", False, "Pending", "waiting for the trainer to start")
        setc("Suspended", suspend_wanted, "Suspended" if suspend_wanted else "NotSuspended",
             "spec.scheduling.suspend is true" if suspend_wanted else "")
    else:
        status["jobName"] = current.job_name
        job_obj = next(j for j in jobs if j["metadata"]["name"] == current.job_name)
        if current.state not in ("Succeeded", "Failed"):
            is_suspended = bool((job_obj.get("spec") or {}).get("suspend"))
            if suspend_wanted and not is_suspended:
                plan.patches.append((job_obj, {"spec": {"suspend": True}}))
                plan.events.append(("Normal", "Suspending",
                                    f"Suspending Job {current.job_name}: the trainer "
                                    f"checkpoints and stops"))
            elif not suspend_wanted and is_suspended and not spec.scheduling.queue_name:
                plan.patches.append((job_obj, {"spec": {"suspend": False}}))
                plan.events.append(("Normal", "Resuming", f"Resuming Job {current.job_name}"))
        setc("Suspended", suspend_wanted, "Suspended" if suspend_wanted else "NotSuspended",
             "spec.scheduling.suspend is true" if suspend_wanted else "")

        if current.state == "Succeeded":
            if artifact is None and artifact_error is None:
                plan.verify_attempt = current  # the controller checks S3, then reconciles again
                phase = "Running"
                setc("Running", True, "Publishing", "verifying the published artifact")
                setc("Ready", False, "Publishing", "verifying the published artifact")
            elif artifact_error:
                terminal_reason, terminal_message = "ArtifactInvalid", artifact_error
                setc("ArtifactPublished", False, "ArtifactInvalid", artifact_error)
            else:
                phase = "Succeeded"
                status["artifact"] = {k: v for k, v in artifact.items() if k != "metrics"}
                if artifact.get("metrics"):
                    status["metrics"] = artifact["metrics"]
                setc("ArtifactPublished", True, "Verified",
                     f"{artifact['uri']} (manifest sha256 {artifact['manifestSha256'][:12]})")
                setc("Running", False, "Succeeded", "training finished")
                setc("Succeeded", True, "Succeeded",
                     f"trained {((current.summary or {}).get('metrics') or {}).get('steps')} "
                     f"steps in {len(by_attempt)} attempt(s)")
                setc("Failed", False, "Succeeded", "")
                setc("Ready", True, "Succeeded", "the adapter is published")
                status["completionTime"] = old.get("completionTime") or current.finished or \
                    _ts(now)
                _eval_gate(job, current, status.get("metrics"), conditions, setc)
                if spec.output.create_adapter:
                    wanted = res.lora_adapter(job, body, artifact)
                    status["adapterRef"] = wanted["metadata"]["name"]
                    if adapter is None:
                        plan.create.append(wanted)
                        plan.events.append(("Normal", "CreatedAdapter",
                                            f"Created LoRAAdapter {wanted['metadata']['name']}"))
        elif current.state == "Failed":
            if current.terminal:
                terminal_reason, terminal_message = current.reason, current.message
            elif current.counts and retries > spec.retry_policy.max_retries:
                terminal_reason = "BackoffLimitExceeded"
                terminal_message = (f"{retries} failed attempts (retryPolicy.maxRetries "
                                    f"{spec.retry_policy.max_retries}); last: "
                                    f"{current.reason}: {current.message}")
            else:
                delay = _backoff(job, retries, settings) if current.counts else 0.0
                finished = _parse_time(current.finished) or now
                due = finished + timedelta(seconds=delay)
                counted = "counts against retries" if current.counts else \
                    "does not count against retries"
                if now >= due:
                    new_attempt(current.number + 1)
                    plan.events.append((
                        "Warning" if current.counts else "Normal", "Retrying",
                        f"Attempt {current.number} ended ({current.reason}: "
                        f"{current.message[:200]}); {counted}; starting attempt "
                        f"{current.number + 1} from the latest checkpoint"))
                    setc("Running", False, "Retrying", f"starting attempt {current.number + 1}")
                    setc("Ready", False, "Retrying", f"attempt {current.number} "
                                                     f"{current.reason}; retrying")
                else:
                    wait = (due - now).total_seconds()
                    plan.requeue_after = wait
                    setc("Running", False, "RetryBackoff",
                         f"attempt {current.number} failed ({current.reason}); retrying in "
                         f"{wait:.0f}s")
                    setc("Ready", False, "RetryBackoff", current.message[:1000])
                phase = "Pending"
        else:
            mapping = {"Running": ("Running", True, "Running"),
                       "Unschedulable": ("Pending", False, "Unschedulable"),
                       "Pending": ("Pending", False, "Pending"),
                       "Suspended": ("Suspended", False, "Suspended")}
            phase, running, reason = mapping[current.state]
            if current.state == "Suspended" and (current.summary or {}).get("queued") and \
                    not suspend_wanted:
                phase, reason = "Queued", "Queued"
            setc("Running", running, reason, current.message)
            setc("Ready", False, reason, current.message)

    if terminal_reason:
        phase = "Failed"
        setc("Running", False, terminal_reason, terminal_message)
        setc("Failed", True, terminal_reason, terminal_message)
        setc("Succeeded", False, terminal_reason, "")
        setc("Ready", False, terminal_reason, terminal_message)
        status["completionTime"] = old.get("completionTime") or _ts(now)
    else:
        if not cond.find(conditions, "Failed"):
            setc("Failed", False, "NoFailure", "")
        if not cond.find(conditions, "Succeeded"):
            setc("Succeeded", False, "NotFinished", "")
    if not cond.find(conditions, "ArtifactPublished"):
        setc("ArtifactPublished", False, "NotPublished", "")

    status["phase"] = phase
    status["conditions"] = conditions
    status = {k: v for k, v in status.items() if v is not None}
    plan.status = status

    if phase in ("Succeeded", "Failed"):
        _expire(plan, job, status, now)
    _transition_events(plan, old, status, terminal_message)
    return plan


FINAL_METRICS = {"trainLoss": float, "evalLoss": float, "exactMatch": float,
                 "normalizedMatch": float, "scoreSamples": int, "baseNormalizedMatch": float,
                 "steps": int, "tokensPerSecond": float}


def final_metrics(raw) -> dict | None:
    """status.metrics from a manifest's metrics: the known numeric fields, nothing else."""
    if not isinstance(raw, dict):
        return None
    out = {}
    for key, kind in FINAL_METRICS.items():
        value = raw.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            out[key] = kind(value)
    for key in ("exactMatch", "normalizedMatch", "baseNormalizedMatch"):
        if key in out and not 0 <= out[key] <= 1:
            del out[key]
    return out or None


def _eval_gate(job: FineTuneJob, attempt: Attempt, metrics: dict | None,
               conditions: list[dict], setc) -> None:
    """spec.evaluationGate → condition EvalPassed from the final eval loss and task score
    (the verified manifest's metrics; the pod's summary when the manifest has none)."""
    gate = job.spec.evaluation_gate
    if gate is None:
        return
    found = dict(final_metrics((attempt.summary or {}).get("metrics")) or {})
    found.update(metrics or {})
    verdicts = []
    if gate.max_eval_loss is not None:
        loss = found.get("evalLoss")
        if loss is None:
            if not cond.find(conditions, "EvalPassed"):  # the summary is gone with the pod
                setc("EvalPassed", False, "NoEvalLoss", "the trainer reported no final eval loss")
            return
        verdicts.append((loss <= gate.max_eval_loss, "EvalLossAboveGate",
                         f"final eval loss {loss:.4f} {'<=' if loss <= gate.max_eval_loss else '>'}"
                         f" maxEvalLoss {gate.max_eval_loss}"))
    if gate.min_score is not None:
        value = found.get(gate.score_metric)
        if value is None:
            if not cond.find(conditions, "EvalPassed"):
                setc("EvalPassed", False, "NoScore",
                     f"the trainer reported no {gate.score_metric} (is the eval data chat or "
                     f"prompt/completion?)")
            return
        verdicts.append((value >= gate.min_score, "ScoreBelowGate",
                         f"{gate.score_metric} {value:.4f} "
                         f"{'>=' if value >= gate.min_score else '<'} minScore {gate.min_score}"))
    ok = all(v[0] for v in verdicts)
    reason = "WithinGate" if ok else next(v[1] for v in verdicts if not v[0])
    setc("EvalPassed", ok, reason, "; ".join(v[2] for v in verdicts))


def _expire(plan: Plan, job: FineTuneJob, status: dict, now: datetime) -> None:
    """ttlSecondsAfterFinished: delete the finished FineTuneJob (its artifacts stay)."""
    ttl = job.spec.ttl_seconds_after_finished
    if ttl is None:
        return
    expires = (_parse_time(status.get("completionTime")) or now) + timedelta(seconds=ttl)
    if now >= expires:
        plan.delete_self = True
        plan.events.append(("Normal", "Expired", "ttlSecondsAfterFinished elapsed; deleting "
                                                 "(artifacts are kept)"))
    else:
        plan.requeue_after = min(plan.requeue_after or 1e9, (expires - now).total_seconds())


def _transition_events(plan: Plan, old: dict, new: dict, message: str) -> None:
    before, after = old.get("phase"), new.get("phase")
    if before == after:
        return
    ready = cond.find(new.get("conditions") or [], "Ready") or {}
    text = ready.get("message") or message or ""
    kind = "Warning" if after == "Failed" else "Normal"
    plan.events.append((kind, after or "Unknown", f"Phase {before or 'None'} -> {after}"
                        + (f": {text[:500]}" if text else "")))
