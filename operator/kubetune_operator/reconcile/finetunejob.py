"""FineTuneJob reconcile, pure: spec + observed children + verification results + now →
children to create or change, the status rebuilt from that world, Events, and when to look again.

No I/O and no clock reads here; the controller gathers the world and applies the plan."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

from kubetune.api.finetunejob import FineTuneJob
from kubetune.contract import ExitCode, TerminationSummary

from .. import conditions as cond
from ..resources import finetunejob as res
from . import tracking
from ..settings import OperatorSettings

MAX_ATTEMPTS_IN_STATUS = 20
DISRUPTION_REASONS = {"PreemptionByScheduler": "Preempted", "PreemptionByKubeScheduler": "Preempted",
                      "EvictionByEvictionAPI": "Evicted", "DeletionByTaintManager": "NodeLost",
                      "DeletionByPodGC": "NodeLost", "TerminationByKubelet": "Evicted"}
# A pod on its way up: nothing a user needs to hear (ImagePullBackOff, ErrImagePull,
# CreateContainerConfigError... are said in the attempt's message).
QUIET_WAITING = frozenset({"ContainerCreating", "PodInitializing"})
KUEUE_LOOK_AGAIN = 30.0  # seconds, while Kueue holds a queued attempt (for its message)
KUEUE_FIRST_LOOK = 3.0  # seconds, until Kueue has said anything (its Workload comes shortly)
# One status write per start, not two. After an attempt's Job is created the first status write
# waits until the attempt has something to say (its pod runs, cannot be scheduled or is stuck;
# Kueue gave a reason; it ended) or until this long after the Job's creation; then one write
# records startTime, the attempt and the phase. Each write of a FineTuneJob costs the apiserver
# a merge patch, managedFields, CEL rules and a watch fan-out (and this operator a reconcile);
# a "Pending" written a second before the pod runs told little. creationTimestamp has whole
# seconds, so a Job observed in the cache waits 1-2 s after its create.
START_WRITE_GRACE = 2.0  # seconds
WAITING_FOR_POD = "waiting for the trainer pod to start"


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
    delete: list[dict] = field(default_factory=list)  # children to delete (background)
    delete_self: bool = False
    status: dict = field(default_factory=dict)  # empty: nothing to write (yet)
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


def finished(job: dict) -> bool:
    """Whether a Job is Complete or Failed."""
    conds = _job_conditions(job)
    return "Complete" in conds or "Failed" in conds


KUEUE_NOT_SERVED = (f"Kueue's Workload API ({res.KUEUE_API}) is not served by this cluster (is "
                    f"Kueue installed?); the Job waits suspended until Kueue admits it")


def kueue_wait(workload: dict | None, served: bool = True) -> tuple[str, str]:
    """Why Kueue holds a queued Job, from its Workload: (reason, message). Queued (no quota
    yet: Kueue's own reason and message; or Kueue is not there at all), Preempted or Evicted
    (and why it waits now), Deactivated (spec.active false), or Admitted (Kueue is about to
    start it)."""
    if not served:
        return "Queued", KUEUE_NOT_SERVED
    if workload is None:
        return "Queued", "queued in Kueue (no Workload yet)"
    conds = {c.get("type"): c for c in (workload.get("status") or {}).get("conditions") or []}

    def said(kind: str) -> str:
        c = conds.get(kind) or {}
        return f"{c.get('reason', '')}: {c.get('message', '')}".strip(": ")

    if (workload.get("spec") or {}).get("active") is False:
        return "Suspended", "the Kueue Workload is deactivated"
    reserved = (conds.get("QuotaReserved") or {}).get("status") == "True"
    evicted = conds.get("Evicted") or {}
    # Evicted first: Kueue sets it before suspending the Job and keeps the quota reserved
    # until the pod is gone; a new reservation resets it to False.
    if evicted.get("status") == "True":
        reason = "Preempted" if evicted.get("reason") == "Preempted" else "Evicted"
        then = "the pod checkpoints and stops" if reserved else \
            f"waiting to be admitted again: {said('QuotaReserved') or 'waiting for quota'}"
        return reason, f"Kueue {said('Evicted')}; {then}"
    if reserved:
        return "Admitted", f"admitted by Kueue ({said('QuotaReserved')}); starting"
    return "Queued", f"Kueue {said('QuotaReserved') or 'waiting for quota'}"


def kueue_said(workload: dict | None, served: bool = True) -> bool:
    """Whether Kueue has spoken about the Workload yet (a reservation, an eviction, or it is
    deactivated): until then its reason is a placeholder worth looking at again soon. Kueue
    not installed is said at once (and looked at again at the slow pace)."""
    if not served:
        return True
    if workload is None:
        return False
    kinds = {c.get("type") for c in (workload.get("status") or {}).get("conditions") or []}
    return bool(kinds & {"QuotaReserved", "Evicted"}) or \
        (workload.get("spec") or {}).get("active") is False


def classify(job: dict, pods: list[dict], workload: dict | None = None,
             kueue_served: bool = True) -> Attempt:
    """What one attempt's Job and pods (and Kueue's Workload of a queued Job, or that Kueue's
    API is not served) say about it."""
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
        attempt.reason, attempt.message = kueue_wait(workload, kueue_served) if queued else \
            ("Suspended", "suspended")
        attempt.summary = {"queued": queued,
                           "kueueSaid": queued and kueue_said(workload, kueue_served)}
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
    attempt.message = WAITING_FOR_POD
    for pod in pods:  # said only when it says something: each new message is a status write
        for c in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (c.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") and waiting["reason"] not in QUIET_WAITING:
                attempt.message = (f"pod {pod['metadata']['name']}: {waiting['reason']}: "
                                   f"{waiting.get('message', '')}").rstrip(": ")
                return attempt
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


@dataclass
class Observed:
    """The world one reconcile sees: the object, its parsed spec (None if invalid) and the
    spec errors, its Jobs and their pods, and what the controller verified in S3."""
    body: dict
    job: FineTuneJob | None
    spec_errors: list[str]
    jobs: list[dict]
    pods: list[dict]
    artifact: dict | None = None  # the verified artifact of the succeeded attempt
    artifact_error: str | None = None  # why it did not verify
    adapter: dict | None = None  # the LoRAAdapter created from it, if any
    config: str | None = None  # the rendered trainer config (rendered here when None)
    workloads: list[dict] = field(default_factory=list)  # Kueue's, of its suspended Jobs
    kueue_served: bool = True  # False: a queued Job's Workload API answered 404 (no Kueue)
    runtime: dict | None = None  # status.runtime: spec.runtimeRef as resolved
    runtime_error: str | None = None  # why spec.runtimeRef could not be resolved


@dataclass
class Attempts:
    """Every attempt, from its Job (live) or from status (a Job already cleaned up)."""
    live: dict[int, Attempt]
    history: list[dict]  # status.attempts, bounded
    retries: int  # attempts that count against retryPolicy.maxRetries
    current: Attempt | None


@dataclass
class Retry:
    """What follows a failed attempt."""
    action: str  # "stop" (terminal) | "now" (start the next attempt) | "wait" (back-off)
    reason: str = ""
    message: str = ""
    wait_seconds: float = 0.0


class _Status:
    """The status being rebuilt: conditions carried over and updated, the fields, the plan."""

    def __init__(self, body: dict, now: datetime):
        self.old = body.get("status") or {}
        self.generation = body["metadata"].get("generation")
        self.now = now
        self.conditions = [dict(c) for c in self.old.get("conditions") or []]
        self.fields: dict = {"observedGeneration": self.generation}
        self.plan = Plan()

    def set(self, kind: str, ok: bool, reason: str, message: str = "") -> None:
        cond.set_condition(self.conditions, kind, ok, reason, message, self.generation,
                           self.now)

    def has(self, kind: str) -> bool:
        return cond.find(self.conditions, kind) is not None

    def done(self, phase: str) -> dict:
        self.fields["phase"] = phase
        self.fields["conditions"] = self.conditions
        self.plan.status = {k: v for k, v in self.fields.items() if v is not None}
        return self.plan.status


def observe_attempts(jobs: list[dict], pods: list[dict], old_status: dict,
                     workloads: list[dict] = (), kueue_served: bool = True) -> Attempts:
    """Classify each Job with its own pods (and Workload); keep attempts whose Job is gone
    from status."""
    live: dict[int, Attempt] = {}
    by_job = {(w["metadata"].get("labels") or {}).get(res.KUEUE_JOB_UID): w for w in workloads}
    for j in jobs:
        number = int(j["metadata"]["labels"][res.LABEL_ATTEMPT])
        job_pods = [p for p in pods if _pod_of(p, j)]
        live[number] = classify(j, job_pods, by_job.get(j["metadata"].get("uid")),
                                kueue_served)
    history = {a["number"]: a for a in old_status.get("attempts") or []}
    for n, attempt in live.items():  # when it started is what status said first (the Job's
        if (history.get(n) or {}).get("startedAt"):  # timestamp may be a second later)
            attempt.started = history[n]["startedAt"]
    attempts = [live[n].status() if n in live else history[n]
                for n in sorted(set(live) | set(history))][-MAX_ATTEMPTS_IN_STATUS:]
    retries = sum(1 for a in attempts if a.get("countsAgainstRetries"))
    return Attempts(live, attempts, retries, live[max(live)] if live else None)


def _pod_of(pod: dict, job: dict) -> bool:
    """Whether a pod is the Job's: by its job-name label and by the Job's uid (a Job deleted
    and created again under its name leaves pods of the old one; a Job known only from its
    create has no uid, and no pods yet)."""
    labels = pod["metadata"].get("labels") or {}
    if labels.get("batch.kubernetes.io/job-name", labels.get("job-name")) != \
            job["metadata"]["name"]:
        return False
    owner = next((r.get("uid") for r in pod["metadata"].get("ownerReferences") or []
                  if r.get("controller")), None)
    return owner is None or owner == job["metadata"].get("uid")


def retry_decision(job: FineTuneJob, failed: Attempt, retries: int,
                   settings: OperatorSettings, now: datetime) -> Retry:
    """After a failed attempt: stop (terminal cause, or retries used up), start the next one
    now, or wait out the back-off. Attempts that do not count (preemption, eviction, a node
    lost) start again at once."""
    policy = job.spec.retry_policy
    if failed.terminal:
        return Retry("stop", failed.reason, failed.message)
    if failed.counts and retries > policy.max_retries:
        return Retry("stop", "BackoffLimitExceeded",
                     f"{retries} failed attempts (retryPolicy.maxRetries {policy.max_retries});"
                     f" last: {failed.reason}: {failed.message}")
    delay = _backoff(job, retries, settings) if failed.counts else 0.0
    due = (_parse_time(failed.finished) or now) + timedelta(seconds=delay)
    if now >= due:
        return Retry("now")
    return Retry("wait", wait_seconds=(due - now).total_seconds())


def reconcile(world: Observed, settings: OperatorSettings, now: datetime) -> Plan:
    """The plan for one FineTuneJob: children to create or patch, its status, Events, when to
    look again."""
    st = _Status(world.body, now)
    if world.runtime is not None:
        st.fields["runtime"] = world.runtime
    if world.runtime_error is not None and not world.jobs:
        return _waiting_for_runtime(world, st)
    stale = _stale(world, st)
    if stale:
        return _spec_changed(st, stale)
    if world.spec_errors or world.job is None:
        return _invalid(world, st)
    spec = world.job.spec
    attempts = observe_attempts(world.jobs, world.pods, st.old, world.workloads,
                                world.kueue_served)
    st.fields.update(attempts=attempts.history, retries=attempts.retries,
                     startTime=st.old.get("startTime") or (
                         attempts.current.started if attempts.current else None))
    current = attempts.current
    terminal: tuple[str, str] | None = None
    created_at = None
    if current is None:
        created = _start_attempt(world, st, settings, 0)
        created_at = now  # created by this plan
        # The status says what the next look will see once the creates succeed (the attempt,
        # pending, suspended or queued): written at once (a Job created suspended), the look
        # its creates bring then writes nothing; else it waits (START_WRITE_GRACE).
        world = replace(world, jobs=[created], pods=[])
        attempts = observe_attempts(world.jobs, [], st.old)
        st.fields.update(attempts=attempts.history, retries=attempts.retries)
        current = attempts.current
    st.fields["jobName"] = current.job_name
    _tracking(st, attempts)
    _suspension(world, st, current)
    if current.state == "Succeeded":
        phase, terminal = _succeeded(world, st, attempts)
    elif current.state == "Failed":
        phase, terminal = _failed(world, st, settings, attempts)
    else:
        phase = _in_flight(spec, st, current)
    if created_at is None:
        job_obj = next(j for j in world.jobs if j["metadata"]["name"] == current.job_name)
        created_at = _parse_time(job_obj["metadata"].get("creationTimestamp")) or now
    return _finish(world, st, phase, terminal, _start_hold(spec, st, current, created_at))


def _start_hold(spec, st: _Status, current: Attempt, created: datetime) -> float | None:
    """Seconds the first status write still waits for the attempt to say something; None:
    write now (START_WRITE_GRACE)."""
    if st.old.get("startTime") or not _starting(spec, current):
        return None
    left = START_WRITE_GRACE - (st.now - created).total_seconds()
    return left if left > 0 else None


def _starting(spec, attempt: Attempt) -> bool:
    """Whether an attempt is only on its way up, with nothing a user needs to see: its pod not
    running yet and not stuck, or its Job queued and Kueue silent so far or admitting it."""
    if attempt.state == "Pending":
        return attempt.message == WAITING_FOR_POD
    if attempt.state == "Suspended":
        summary = attempt.summary or {}
        return bool(summary.get("queued")) and not spec.scheduling.suspend and (
            not summary.get("kueueSaid") or attempt.reason == "Admitted")
    return False


def _stale(world: Observed, st: _Status) -> list[dict]:
    """Jobs built from an older generation of the spec, while no start is recorded."""
    if st.old.get("startTime") or st.generation is None:
        return []
    return [j for j in world.jobs if (res.built_from(j) or st.generation) < st.generation]


def _spec_changed(st: _Status, stale: list[dict]) -> Plan:
    """The spec changed after an attempt's Job was created but before status recorded the
    start (status.startTime; from then on admission keeps the training inputs as they are):
    the Job runs a spec that is no more. It is deleted, its pods with it, without counting as
    an attempt, and the look that finds it gone starts again from the current spec (the same
    attempt number and Job name). This window was the milliseconds between the create and the
    first status write before that write waited for the pod (START_WRITE_GRACE), and a change
    made in it was silently ignored: the attempt ran the old spec."""
    for job in stale:
        if job["metadata"].get("deletionTimestamp"):
            continue  # on its way out: its DELETED event brings the next look
        st.plan.delete.append(job)
        st.plan.events.append((
            "Normal", "SpecChanged",
            f"Deleting Job {job['metadata']['name']}: it was built from generation "
            f"{res.built_from(job)} and the spec changed (generation {st.generation}) before "
            f"the start was recorded; starting again from the new spec (not counted as an "
            f"attempt)"))
    return st.plan  # no status: nothing has started


RUNTIME_LOOK_AGAIN = 30.0  # seconds between looks for a runtime that does not exist yet


def _waiting_for_runtime(world: Observed, st: _Status) -> Plan:
    """spec.runtimeRef names no runtime (yet): nothing starts; look again. Not a failure: an
    admin may create the runtime after the job."""
    message = world.runtime_error or ""
    st.set("Ready", False, "RuntimeNotFound", message)
    st.set("Running", False, "RuntimeNotFound", message)
    status = st.done("Pending")
    if (cond.find(st.old.get("conditions") or [], "Ready") or {}).get("reason") != \
            "RuntimeNotFound":
        st.plan.events.append(("Warning", "RuntimeNotFound", message))
    _transition_events(st.plan, st.old, status, message)
    st.plan.requeue_after = RUNTIME_LOOK_AGAIN
    return st.plan


def _tracking(st: _Status, attempts: Attempts) -> None:
    """status.tracking from the trainer's reports; a Warning when tracking failed."""
    found = tracking.status({n: a.summary for n, a in attempts.live.items()},
                            st.old.get("tracking"))
    st.fields["tracking"] = found
    st.plan.events.extend(tracking.events(st.old.get("tracking"), found))


def _invalid(world: Observed, st: _Status) -> Plan:
    message = "; ".join(world.spec_errors)
    for kind in ("Running", "Succeeded", "Suspended", "ArtifactPublished"):
        st.set(kind, False, "InvalidSpec", message)
    st.set("Failed", True, "InvalidSpec", message)
    st.set("Ready", False, "InvalidSpec", message)
    _stalled(st)
    st.fields["completionTime"] = st.old.get("completionTime") or _ts(st.now)
    status = st.done("Failed")
    if world.job is not None:
        _expire(st.plan, world.job, status, st.now)
    _transition_events(st.plan, st.old, status, message)
    return st.plan


def _start_attempt(world: Observed, st: _Status, settings: OperatorSettings,
                   number: int) -> dict:
    """The children of attempt `number` (the shared ones are idempotent: 409 on repeat);
    returns its Job as it will be once created (stamped with `now`)."""
    job, body, spec = world.job, world.body, world.job.spec
    name = body["metadata"]["name"]
    st.plan.create.extend(res.rbac(body, shared=settings.trainer_rbac == "shared"))
    if spec.resources.nodes > 1:
        st.plan.create.append(res.headless_service(body, number))
    suspended = spec.scheduling.suspend or bool(spec.scheduling.queue_name)  # Kueue admits it
    training = res.training_job(job, body, number, settings, suspended, world.config)
    st.plan.create.append(training)
    st.plan.events.append(("Normal", "CreatedJob",
                           f"Created Job {res.job_name(name, number)} (attempt {number})"))
    st.fields["jobName"] = res.job_name(name, number)
    st.fields["startTime"] = st.fields.get("startTime") or _ts(st.now)
    return {**training, "metadata": {**training["metadata"], "creationTimestamp": _ts(st.now)}}


def _suspended_condition(spec, st: _Status) -> None:
    wanted = spec.scheduling.suspend
    st.set("Suspended", wanted, "Suspended" if wanted else "NotSuspended",
           "spec.scheduling.suspend is true" if wanted else "")


KUEUE_ACTIVATED = "the Kueue Workload is activated again; waiting for Kueue to admit it"


def _queued_again(st: _Status, current: Attempt) -> None:
    """A queued job resumed: what was observed (a deactivated Workload) is no longer what this
    plan leaves behind, so the attempt says it queues again (not "deactivated" until a look
    30 s later) and is looked at again soon, for Kueue's own word."""
    current.reason, current.message = "Queued", KUEUE_ACTIVATED
    current.summary = {**(current.summary or {}), "kueueSaid": False}
    st.fields["attempts"] = [current.status() if a.get("number") == current.number else a
                             for a in st.fields.get("attempts") or []]


def _suspension(world: Observed, st: _Status, current: Attempt) -> None:
    """spec.scheduling.suspend → the running attempt's Job; when queued, its Kueue Workload
    (Kueue owns a queued Job's `suspend` and would start an admitted Job again: a Workload
    with `spec.active: false` is Kueue's own way to stop it)."""
    spec = world.job.spec
    job_obj = next(j for j in world.jobs if j["metadata"]["name"] == current.job_name)
    if spec.scheduling.queue_name:
        uid = job_obj["metadata"].get("uid")
        workload = next((w for w in world.workloads if uid and (
            w["metadata"].get("labels") or {}).get(res.KUEUE_JOB_UID) == uid), None)
        active = (workload or {}).get("spec", {}).get("active") is not False
        if current.state not in ("Succeeded", "Failed") and workload is not None and \
                active == spec.scheduling.suspend:
            st.plan.patches.append((workload, {"spec": {"active": not spec.scheduling.suspend}}))
            st.plan.events.append(
                ("Normal", "Suspending", f"Deactivating the Kueue Workload of Job "
                 f"{current.job_name}: the trainer checkpoints and stops")
                if spec.scheduling.suspend else
                ("Normal", "Resuming", f"Activating the Kueue Workload of Job "
                 f"{current.job_name}: it queues again"))
            if not spec.scheduling.suspend:
                _queued_again(st, current)
    elif current.state not in ("Succeeded", "Failed"):
        is_suspended = bool((job_obj.get("spec") or {}).get("suspend"))
        if spec.scheduling.suspend and not is_suspended:
            st.plan.patches.append((job_obj, {"spec": {"suspend": True}}))
            st.plan.events.append(("Normal", "Suspending",
                                   f"Suspending Job {current.job_name}: the trainer "
                                   f"checkpoints and stops"))
        elif not spec.scheduling.suspend and is_suspended:
            st.plan.patches.append((job_obj, {"spec": {"suspend": False}}))
            st.plan.events.append(("Normal", "Resuming", f"Resuming Job {current.job_name}"))
    _suspended_condition(spec, st)


def _succeeded(world: Observed, st: _Status, attempts: Attempts
               ) -> tuple[str, tuple[str, str] | None]:
    """The trainer succeeded: verify the artifact (the controller's next look), then publish
    it in status, gate it, and create the LoRAAdapter."""
    current, artifact = attempts.current, world.artifact
    if artifact is None and world.artifact_error is None:
        st.plan.verify_attempt = current  # the controller checks S3, then reconciles again
        st.set("Running", True, "Publishing", "verifying the published artifact")
        st.set("Ready", False, "Publishing", "verifying the published artifact")
        return "Running", None
    if world.artifact_error:
        st.set("ArtifactPublished", False, "ArtifactInvalid", world.artifact_error)
        return "Failed", ("ArtifactInvalid", world.artifact_error)
    job = world.job
    st.fields["artifact"] = {k: v for k, v in artifact.items() if k != "metrics"}
    if artifact.get("metrics"):
        st.fields["metrics"] = artifact["metrics"]
    st.set("ArtifactPublished", True, "Verified",
           f"{artifact['uri']} (manifest sha256 {artifact['manifestSha256'][:12]})")
    st.set("Running", False, "Succeeded", "training finished")
    st.set("Succeeded", True, "Succeeded",
           f"trained {((current.summary or {}).get('metrics') or {}).get('steps')} "
           f"steps in {len(attempts.live)} attempt(s)")
    st.set("Failed", False, "Succeeded", "")
    st.set("Ready", True, "Succeeded", "the adapter is published")
    st.fields["completionTime"] = st.old.get("completionTime") or current.finished or \
        _ts(st.now)
    _eval_gate(job, current, st.fields.get("metrics"), st.conditions, st.set)
    if job.spec.output.create_adapter:
        wanted = res.lora_adapter(job, world.body, artifact)
        st.fields["adapterRef"] = wanted["metadata"]["name"]
        if world.adapter is None:
            st.plan.create.append(wanted)
            st.plan.events.append(("Normal", "CreatedAdapter",
                                   f"Created LoRAAdapter {wanted['metadata']['name']}"))
    return "Succeeded", None


def _failed(world: Observed, st: _Status, settings: OperatorSettings, attempts: Attempts
            ) -> tuple[str, tuple[str, str] | None]:
    current = attempts.current
    retry = retry_decision(world.job, current, attempts.retries, settings, st.now)
    if retry.action == "stop":
        return "Failed", (retry.reason, retry.message)
    if retry.action == "now":
        _start_attempt(world, st, settings, current.number + 1)
        counted = "counts against retries" if current.counts else \
            "does not count against retries"
        st.plan.events.append((
            "Warning" if current.counts else "Normal", "Retrying",
            f"Attempt {current.number} ended ({current.reason}: {current.message[:200]}); "
            f"{counted}; starting attempt {current.number + 1} from the latest checkpoint"))
        st.set("Running", False, "Retrying", f"starting attempt {current.number + 1}")
        st.set("Ready", False, "Retrying", f"attempt {current.number} {current.reason}; "
                                           f"retrying")
    else:
        st.plan.requeue_after = retry.wait_seconds
        st.set("Running", False, "RetryBackoff",
               f"attempt {current.number} failed ({current.reason}); retrying in "
               f"{retry.wait_seconds:.0f}s")
        st.set("Ready", False, "RetryBackoff", current.message[:1000])
    return "Pending", None


IN_FLIGHT = {"Running": ("Running", True, "Running"),
             "Unschedulable": ("Pending", False, "Unschedulable"),
             "Pending": ("Pending", False, "Pending"),
             "Suspended": ("Suspended", False, "Suspended")}


def _in_flight(spec, st: _Status, current: Attempt) -> str:
    phase, running, reason = IN_FLIGHT[current.state]
    if current.state == "Suspended" and (current.summary or {}).get("queued") and \
            not spec.scheduling.suspend:
        # Kueue's word (Queued, Preempted, Evicted, Admitted); the Workload's changes bring
        # no event here, so look again while it waits.
        phase, reason = "Queued", current.reason
        st.plan.requeue_after = KUEUE_LOOK_AGAIN if current.summary.get("kueueSaid") \
            else KUEUE_FIRST_LOOK
    st.set("Running", running, reason, current.message)
    st.set("Ready", False, reason, current.message)
    return phase


def _stalled(st: _Status) -> None:
    """Stalled mirrors Failed: kstatus' word for it (Flux's `wait`, cli-utils, `kubectl wait`
    read Stalled=True as Failed and stop waiting at once instead of timing out)."""
    failed = cond.find(st.conditions, "Failed")
    st.set("Stalled", failed["status"] == "True", failed["reason"], failed.get("message", ""))


def _finish(world: Observed, st: _Status, phase: str, terminal: tuple[str, str] | None,
            hold: float | None = None) -> Plan:
    """The conditions every status carries, the terminal state, TTL expiry and Events; with
    `hold` (seconds), no status yet: a look again then (START_WRITE_GRACE)."""
    message = ""
    if terminal:
        phase, (reason, message) = "Failed", terminal
        st.set("Running", False, reason, message)
        st.set("Failed", True, reason, message)
        st.set("Succeeded", False, reason, "")
        st.set("Ready", False, reason, message)
        st.fields["completionTime"] = st.old.get("completionTime") or _ts(st.now)
    else:
        if not st.has("Failed"):
            st.set("Failed", False, "NoFailure", "")
        if not st.has("Succeeded"):
            st.set("Succeeded", False, "NotFinished", "")
    if not st.has("ArtifactPublished"):
        st.set("ArtifactPublished", False, "NotPublished", "")
    _stalled(st)
    status = st.done(phase)
    if hold is not None:
        st.plan.status = {}
        st.plan.requeue_after = min(hold, st.plan.requeue_after or hold)
        return st.plan
    if phase in ("Succeeded", "Failed"):
        _expire(st.plan, world.job, status, st.now)
    _transition_events(st.plan, st.old, status, message)
    return st.plan


FINAL_METRICS = {"trainLoss": float, "evalLoss": float, "exactMatch": float,
                 "normalizedMatch": float, "scoreSamples": int, "baseNormalizedMatch": float,
                 "preferenceAccuracy": float, "preferenceMargin": float,
                 "basePreferenceMargin": float, "rewardMargin": float,
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
    for key in ("exactMatch", "normalizedMatch", "baseNormalizedMatch", "preferenceAccuracy"):
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
                hint = ("does the eval split have preference pairs?"
                        if gate.score_metric == "preferenceAccuracy"
                        else "is the eval data chat or prompt/completion?")
                setc("EvalPassed", False, "NoScore",
                     f"the trainer reported no {gate.score_metric} ({hint})")
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
    if before is None and after in ("Pending", "Queued", "Suspended") and new.get("jobName"):
        return  # the first status of a Job created: "Created Job …" said it
    ready = cond.find(new.get("conditions") or [], "Ready") or {}
    text = ready.get("message") or message or ""
    kind = "Warning" if after == "Failed" else "Normal"
    plan.events.append((kind, after or "Unknown", f"Phase {before or 'None'} -> {after}"
                        + (f": {text[:500]}" if text else "")))
