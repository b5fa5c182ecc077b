"""FineTuneJob controller glue: gather the world from the caches (and S3 when an attempt
succeeded), run the pure reconcile, apply its plan through `kube`, schedule the next look."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import structlog

from kubetune.api.trainerstatus import NAMESPACE_BINDING
from kubetune.api.validation import SpecError, parse

from . import conditions as cond
from . import metrics, policy, runtimes
from .cache import Caches, Key, job_view
from .kube import Kube, NotOwned, controller_uid
from .reconcile import finetunejob as rec
from .resources import finetunejob as res
from .runner import Reported, namespace_terminating, run_reconcile
from .settings import OperatorSettings
from .workqueue import WorkQueue

log = structlog.get_logger("kubetune.operator")
CHILD_EVENT_DELAY = 0.3  # seconds
CREATES_AT_ONCE = 3  # the most creates of one FineTuneJob in flight together
NAMESPACE_BINDING_RECHECK = 600.0  # seconds: a namespace's trainer RoleBinding, made again
CONFLICT_LOOK_AGAIN = 0.2  # seconds: a conditional status write met a newer object
# Ready=False reasons of a start that could not create its children (said in status and one
# Warning Event per new message; the look is retried with back-off, or in 30 s for a conflict).
CREATE_REFUSED = "CreateRefused"  # the apiserver refused a create: admission, quota, invalid
CHILD_CONFLICT = "ChildConflict"  # a child's name is taken by an object we do not control


def creation_waves(objs: list[dict]) -> list[list[dict]]:
    """Children grouped by what must exist first; the creates of one wave run together.
    The ServiceAccount (a Job's pods cannot be created without it) and the Role (a
    RoleBinding is only made once the Role is known to be this job's own) come first, with
    the namespace's shared RoleBinding (it depends on nothing of the job); then the job's
    RoleBinding, the Service and the Job. Five round trips in a row became two."""
    def early(o: dict) -> bool:
        return o["kind"] in ("ServiceAccount", "Role") or _namespace_binding(o)

    first = [o for o in objs if early(o)]
    rest = [o for o in objs if not early(o)]
    return [wave for wave in (first, rest) if wave]


class FineTuneJobController:
    def __init__(self, kube: Kube, settings: OperatorSettings, caches: Caches):
        self.kube = kube
        self.settings = settings
        self.caches = caches
        # Events only queue a key; workers reconcile it, one worker per key at a time, and a
        # burst of child events (a pod's many updates) becomes one reconcile.
        self.queue = WorkQueue(self.reconcile, settings.finetunejob_workers,
                               settings.finetunejob_workers_per_namespace,
                               lane_of=lambda k: k[0], name="kubetune-finetunejob")
        self.listeners: list = []  # called with each changed FineTuneJob (its adapters look)
        # The creates of a wave past its first run here (the worker makes the first itself).
        self._creates = ThreadPoolExecutor((CREATES_AT_ONCE - 1) * settings.finetunejob_workers,
                                           thread_name_prefix="kubetune-create")
        self._configs: dict[Key, tuple[tuple, str]] = {}  # (uid, generation), trainer config
        self._bound: dict[str, float] = {}  # namespace -> when its trainer binding was made

    def reconcile(self, key: Key) -> None:
        body = self.caches.finetunejobs.get(key)
        if body is not None and body["metadata"].get("deletionTimestamp"):
            body = None  # being deleted: owner references clean up the children
        if run_reconcile("FineTuneJob", key, body, self._reconcile,
                         self.queue.retry) != "error":
            self.queue.forget(key)

    def _reconcile(self, key: Key, body: dict) -> None:
        ns, name = key
        bound = log.bind(namespace=ns, name=name, uid=body["metadata"].get("uid"),
                         generation=body["metadata"].get("generation"))
        runtime = runtimes.resolve(body, self._read_runtime)
        resolved = runtime.body if runtime.body is not None else body
        errors: list[str] = list(runtime.errors)
        job = None
        try:
            job = parse(resolved)
        except SpecError as exc:
            errors += exc.errors
        errors += rec.semantic_errors(body)
        if job is not None:
            errors += policy.finetunejob_errors(job, self.settings, runtime.trusted)
        config = None
        if job is not None and not errors:
            try:
                config = self._config(key, resolved, job, runtime.generation)
            except ValueError as exc:
                errors.append(f"spec: {exc}")
        # Only children this object controls count, whatever labels a look-alike carries.
        uid = body["metadata"].get("uid")
        every = self.caches.jobs.children(key)
        jobs = [j for j in every if controller_uid(j) == uid]
        foreign = {j["metadata"].get("uid") for j in every if controller_uid(j) != uid}
        # A deleted attempt's pods still tell how it ended, so pods are kept unless a
        # look-alike Job (or nothing) controls them.
        pods = [p for p in self.caches.pods.children(key)
                if controller_uid(p) is not None and controller_uid(p) not in foreign]
        old = body.get("status") or {}
        artifact = res.sealed_artifact(body)
        if old.get("artifact") and artifact is None:
            bound.warning("status.artifact is not the one this operator verified; verifying "
                          "the attempt's artifact again")
        adapter = {"exists": True} if old.get("adapterRef") else None
        now = datetime.now(timezone.utc)
        workloads = self._workloads(ns, jobs, job)
        world = rec.Observed(body, job, errors, jobs, pods, artifact, None, adapter, config,
                             workloads=workloads or [], kueue_served=workloads is not None,
                             runtime=runtime.status, runtime_error=runtime.error)
        plan = rec.reconcile(world, self.settings, now)
        if plan.verify_attempt is not None:
            world.artifact, world.artifact_error = self._verify(job, body, plan.verify_attempt)
            plan = rec.reconcile(world, self.settings, now)
        self._apply(key, body, plan, bound)

    def _workloads(self, ns: str, jobs: list[dict], job) -> list[dict] | None:
        """Kueue's Workloads of this job's queued Jobs, read only when they are needed: while
        Kueue holds a Job (why it waits) or to suspend one (the Workload is deactivated).
        None: Kueue's Workload API is not served (Kueue is not installed)."""
        wanted = [j["metadata"]["uid"] for j in jobs
                  if res.KUEUE_QUEUE in (j["metadata"].get("labels") or {})
                  and not rec.finished(j)
                  and ((j.get("spec") or {}).get("suspend") or
                       (job is not None and job.spec.scheduling.suspend))]
        if not wanted:
            return []
        return self.kube.workloads(ns, f"{res.KUEUE_JOB_UID} in ({','.join(wanted)})")

    def _read_runtime(self, kind: str, namespace: str, name: str) -> dict | None:
        return self.kube.runtime(kind, namespace, name)

    def _config(self, key: Key, body: dict, job, runtime_generation=None) -> str:
        """The rendered trainer config, once per spec (and runtime) generation (YAML rendering
        was a tenth of the operator's CPU when every reconcile rendered it to check it)."""
        meta = body["metadata"]
        version = (meta.get("uid"), meta.get("generation"), runtime_generation)
        held = self._configs.get(key)
        if held is None or held[0] != version:
            held = (version, res.trainer_config(job, body, self.settings))
            self._configs[key] = held
        return held[1]

    def _verify(self, job, body: dict, attempt: rec.Attempt) -> tuple[dict | None, str | None]:
        """Check the published artifact against its manifest (never deletes anything)."""
        from kubetune.artifacts import VerificationError, described, verify
        from kubetune.storage import StorageError, shared

        summary = attempt.summary if isinstance(attempt.summary, dict) else {}
        published = summary.get("artifact")
        if not published:
            return None, "the trainer succeeded but reported no artifact"
        if not isinstance(published, dict) or not isinstance(published.get("uri"), str) or \
                not isinstance(published.get("manifestSha256"), str):
            return None, "the trainer's summary names no artifact URI and manifest digest"
        out = job.spec.output
        keys = {}
        secret = out.credentials_secret.name if out.credentials_secret else \
            self.settings.s3_credentials_secret
        if secret:
            data = self.kube.secret_data(body["metadata"]["namespace"], secret)
            keys = {"access_key": data.get("AWS_ACCESS_KEY_ID"),
                    "secret_key": data.get("AWS_SECRET_ACCESS_KEY")}
        storage = shared(out.endpoint or self.settings.s3_endpoint,
                         out.region or self.settings.s3_region, retries=3,
                         deadline=self.settings.s3_deadline_seconds, **keys)
        try:
            manifest, digest = verify(published["uri"], storage,
                                      expected_sha256=published["manifestSha256"])
        except (VerificationError, StorageError) as exc:
            metrics.S3_ERRORS.labels(operation="verify").inc()
            return None, str(exc)
        about = described(manifest)
        if not about["method"] or not about["baseModelUri"]:
            return None, (f"{published['uri']}: the manifest names no method type or base "
                          f"model URI")
        artifact = {"uri": published["uri"], "manifestSha256": digest,
                    "sizeBytes": about["sizeBytes"], "method": about["method"],
                    "baseModelUri": about["baseModelUri"],
                    "baseModelRevision": about["baseModelRevision"],
                    "datasetSha256": about["datasetSha256"],
                    "trackingRunId": about["trackingRunId"]}
        merged = summary.get("merged")
        if isinstance(merged, dict) and isinstance(merged.get("uri"), str):
            artifact["mergedModelUri"] = merged["uri"][:2048]
        artifact["metrics"] = rec.final_metrics(about["metrics"])
        return {k: v for k, v in artifact.items() if v is not None}, None

    def _create_all(self, objs: list[dict]) -> list:
        """Create each object, all at once; per object: True (created), False (it was there
        and is ours) or the exception its create raised."""
        def create(obj: dict):
            try:
                return self.kube.create(obj)
            except Exception as exc:  # noqa: BLE001 - returned, raised by the caller
                return exc

        others = [self._creates.submit(create, obj) for obj in objs[1:]]
        return [create(objs[0])] + [f.result() for f in others]

    def _apply(self, key: Key, body: dict, plan: rec.Plan, log) -> None:
        ns, name = key
        now = time.monotonic()
        # The namespace's shared trainer RoleBinding is made once (again every ten minutes, in
        # case someone deleted it), not once per job.
        creates = [o for o in plan.create if not _namespace_binding(o) or
                   now - self._bound.get(ns, -NAMESPACE_BINDING_RECHECK)
                   >= NAMESPACE_BINDING_RECHECK]
        for wave in creation_waves(creates):
            outcomes = self._create_all(wave)
            for obj, outcome in zip(wave, outcomes):
                if isinstance(outcome, BaseException):
                    continue
                if _namespace_binding(obj):
                    self._bound[ns] = now
                if obj["kind"] == "Job":
                    # write-through: the watch event follows
                    self.caches.jobs.put(key, job_view(obj))
                if outcome and obj["kind"] in ("Job", "LoRAAdapter"):
                    log.info(f"Created {obj['kind']}", child=obj["metadata"]["name"])
            conflict = next((o for o in outcomes if isinstance(o, NotOwned)), None)
            if conflict is not None:
                # Never adopt a look-alike: say so, create nothing after it, look again later.
                if self._create_failed(key, body, CHILD_CONFLICT, str(conflict)):
                    self.kube.event(body, "Warning", CHILD_CONFLICT, str(conflict))
                log.warning("Child name taken by another owner", error=str(conflict))
                self.queue.add(key, 30)
                return
            failed = next(((o, f) for o, f in zip(wave, outcomes)
                           if isinstance(f, BaseException)), None)
            if failed is not None:
                obj, exc = failed
                if _refused(exc):
                    # Admission (a policy, Kueue's webhook), a quota or an invalid object: no
                    # retry alone mends it, so the user hears why the job does not start.
                    message = (f"creating {obj['kind']} {obj['metadata']['name']} was refused "
                               f"by the apiserver ({exc.status}): {_api_message(exc)}")
                    if self._create_failed(key, body, CREATE_REFUSED, message):
                        self.kube.event(body, "Warning", CREATE_REFUSED, message)
                    raise Reported(message) from exc
                raise exc
        for obj, patch in plan.patches:
            self.kube.patch(obj, patch)
        for obj in plan.delete:
            self.kube.delete(obj)
            log.info(f"Deleted {obj['kind']}", child=obj["metadata"]["name"])
            if obj["kind"] == "Job":
                # write-through: a look before the watch says it is gone deletes nothing more
                stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                self.caches.jobs.put(key, {**obj, "metadata": {**obj["metadata"],
                                                               "deletionTimestamp": stamp}})
        artifact = plan.status.get("artifact")
        seal = res.artifact_seal(artifact) if isinstance(artifact, dict) else None
        if seal and ((body["metadata"].get("annotations") or {})
                     .get(res.ANNOTATION_ARTIFACT_SEAL)) != seal:
            # sealed first: a status written after it is trusted; one forged later is not
            self.kube.patch(body, {"metadata": {"annotations": {
                res.ANNOTATION_ARTIFACT_SEAL: seal}}})
            body["metadata"].setdefault("annotations", {})[res.ANNOTATION_ARTIFACT_SEAL] = seal
        old = body.get("status") or {}
        if plan.status and (_changed(old, plan.status) or
                            (artifact is not None and old.get("artifact") != artifact)):
            # The write that records the start is conditional: it holds only if the spec is
            # still the one the attempt's Job was built from (admission keeps it from then on).
            # On a conflict the Events go anyway (a phase Event may come twice).
            first = bool(plan.status.get("startTime")) and not old.get("startTime")
            if self.kube.patch_status("FineTuneJob", ns, name, plan.status,
                                      body["metadata"].get("resourceVersion") if first else None):
                body.setdefault("status", {}).update(plan.status)
                metrics.observe_phase(key, plan.status.get("phase"))
            else:
                log.info("Status not written: the FineTuneJob changed; looking again")
                self.queue.add(key, CONFLICT_LOOK_AGAIN)
        for kind, reason, message in plan.events:
            self.kube.event(body, kind, reason, message)
            log.info(message, reason=reason)
        if plan.delete_self:
            self.kube.delete_custom("FineTuneJob", ns, name)
        if plan.requeue_after is not None:
            self.queue.add(key, plan.requeue_after + 0.05)

    def _create_failed(self, key: Key, body: dict, reason: str, message: str) -> bool:
        """Ready=False with why the start's children could not be created, the rest of status
        as it was; True when that is news (the caller's Warning Event is sent once per new
        message, not on every retry). The next look that creates them rebuilds Ready."""
        ns, name = key
        old = body.get("status") or {}
        conditions = [dict(c) for c in old.get("conditions") or []]
        generation = body["metadata"].get("generation")
        if not cond.set_condition(conditions, "Ready", False, reason, message[:4000],
                                  generation, datetime.now(timezone.utc)):
            return False
        status = {"phase": old.get("phase") or "Pending", "conditions": conditions,
                  "observedGeneration": generation}
        if self.kube.patch_status("FineTuneJob", ns, name, status):
            body.setdefault("status", {}).update(status)
        return True

    # ---- cache maintenance (called by the kopf handlers) -----------------------------------
    def on_finetunejob(self, event_type: str, body: dict) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if event_type == "DELETED":
            self.caches.finetunejobs.pop(key, None)
            self._configs.pop(key, None)
            self.caches.jobs.forget(key)
            self.caches.pods.forget(key)
            metrics.observe_phase(key, None)
            return
        self.caches.finetunejobs[key] = body
        self.queue.add(key)
        for listener in self.listeners:
            listener(body)

    def on_child(self, store, event_type: str, body: dict) -> None:
        owner = (body["metadata"]["namespace"],
                 (body["metadata"].get("labels") or {}).get(res.LABEL_JOB))
        if owner[1] is None:
            return
        if event_type == "DELETED" and store is not self.caches.pods:
            store.remove(owner, body["metadata"]["name"])
        else:
            # A deleted pod's last state still tells how its attempt ended (DisruptionTarget,
            # exit code); it is kept until its FineTuneJob goes.
            store.put(owner, body)
        if owner in self.caches.finetunejobs:
            # A Job's and its pods' updates come in bursts (created, scheduled, running):
            # one look shortly after the first of them sees them all (one status write).
            self.queue.add(owner, CHILD_EVENT_DELAY)


def _refused(exc: BaseException) -> bool:
    """A create the apiserver answered with a client error that waiting alone will not mend
    (403 admission or quota, 422 invalid, 400...), not a conflict (409, handled), throttling
    (429) or a namespace on its way out."""
    status = getattr(exc, "status", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (409, 429) \
        and not namespace_terminating(exc)


def _api_message(exc: BaseException) -> str:
    """The apiserver's own message (a Status object's `message`), else the exception's text."""
    try:
        message = json.loads(getattr(exc, "body", None) or "").get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or exc)[:2000]


def _namespace_binding(obj: dict) -> bool:
    return obj["kind"] == "RoleBinding" and obj["metadata"]["name"] == NAMESPACE_BINDING


def _changed(old: dict, new: dict) -> bool:
    """Whether a status patch would change anything (progress belongs to the trainer)."""
    def strip(status: dict) -> dict:
        return {k: v for k, v in status.items() if k != "progress"}
    merged = {**strip(old), **strip(new)}
    return merged != strip(old)
