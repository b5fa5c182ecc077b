"""Kueue, as the FineTuneJob reconcile reads it: a queued Job's Workload says why it waits
(Kueue's own reason and message), a preempted attempt is not a failure, and suspending a
queued job deactivates its Workload instead of fighting Kueue over the Job's `suspend`."""

from datetime import timedelta
from pathlib import Path

import pytest

from kubetune.devcluster import kueue
from kubetune_operator.reconcile import finetunejob as rec
from kubetune_operator.resources import finetunejob as res

from kubetune.api.validation import parse
from test_finetunejob_reconcile import NOW, SETTINGS, _body, _cond, _job, _pod

pytestmark = pytest.mark.unit

PENDING = ("QuotaReserved", "False", "Pending",
           "couldn't assign flavors to pod set trainer: insufficient unused quota for "
           "nvidia.com/gpu in flavor default-flavor, 1 more needed")
PREEMPTED = ("Evicted", "True", "Preempted",
             "Preempted to accommodate a workload (UID: u2, JobUID: j2) due to "
             "prioritization in the ClusterQueue")
RESERVED = ("QuotaReserved", "True", "QuotaReserved",
            "Quota reserved in ClusterQueue kubetune-gpus")


def _queued_job(number=0, suspend=True, uid="job-uid-0"):
    job = _job(number, suspend=suspend)
    job["metadata"]["uid"] = uid
    job["metadata"]["labels"][res.KUEUE_QUEUE] = "team-a"
    return job


def _workload(*conditions, active=None, job_uid="job-uid-0"):
    wl = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
          "metadata": {"name": "job-quickstart-lora-0-1a2b3", "namespace": "ml",
                       "labels": {res.KUEUE_JOB_UID: job_uid}},
          "spec": {"queueName": "team-a"},
          "status": {"conditions": [{"type": t, "status": s, "reason": r, "message": m}
                                    for t, s, r, m in conditions]}}
    if active is not None:
        wl["spec"]["active"] = active
    return wl


def _queued_run(jobs, pods=(), workloads=(), now=NOW, kueue_served=True, **spec):
    body = _body(scheduling={"queueName": "team-a", **spec.pop("scheduling", {})}, **spec)
    world = rec.Observed(body, parse(body), [], list(jobs), list(pods), None, None,
                         workloads=list(workloads), kueue_served=kueue_served)
    return rec.reconcile(world, SETTINGS, now)


@pytest.mark.parametrize("workload, reason, said", [
    (None, "Queued", "no Workload yet"),
    (_workload(PENDING), "Queued", "Kueue Pending: couldn't assign flavors"),
    (_workload(PREEMPTED, PENDING), "Preempted",
     "Kueue Preempted: Preempted to accommodate a workload"),
    (_workload(("Evicted", "True", "PodsReadyTimeout", "Exceeded the PodsReady timeout"),
               PENDING), "Evicted", "PodsReadyTimeout"),
    # Being preempted: Kueue keeps the quota until the pod is gone (seen on the real Kueue).
    (_workload(RESERVED, PREEMPTED), "Preempted", "the pod checkpoints and stops"),
    (_workload(RESERVED, ("Evicted", "False", "QuotaReserved", "Previously: Preempted")),
     "Admitted", "admitted by Kueue"),
    (_workload(PENDING, active=False), "Suspended", "deactivated"),
])
def test_why_kueue_holds_a_job_is_read_from_its_workload(workload, reason, said):
    got_reason, message = rec.kueue_wait(workload)
    assert got_reason == reason
    assert said in message
    if workload is not None and reason == "Preempted" and "checkpoints" not in said:
        assert "waiting to be admitted again: Pending: couldn't assign" in message


def test_within_the_grace_a_queued_job_is_written_only_once_kueue_gives_a_reason():
    """START_WRITE_GRACE after its create: no status while Kueue has said nothing (no Workload,
    no condition) or has just admitted the Job (its pod comes next); at once when Kueue holds
    it for want of quota."""
    job = _queued_job()
    job["metadata"]["creationTimestamp"] = "2026-11-28T12:00:00Z"
    soon = NOW + timedelta(seconds=0.5)
    for workloads in ([], [_workload()], [_workload(RESERVED)]):
        plan = _queued_run([job], workloads=workloads, now=soon)
        assert plan.status == {} and plan.requeue_after == pytest.approx(1.5), workloads
    plan = _queued_run([job], workloads=[_workload(PENDING)], now=soon)
    assert plan.status["phase"] == "Queued" and plan.status["startTime"]
    assert "insufficient unused quota" in _cond(plan, "Ready")["message"]
    later = _queued_run([job], now=NOW + timedelta(seconds=rec.START_WRITE_GRACE))
    assert later.status["phase"] == "Queued" and later.requeue_after == rec.KUEUE_FIRST_LOOK


def test_a_queued_job_waits_with_kueues_reason_and_is_looked_at_again():
    plan = _queued_run([_queued_job()], workloads=[_workload(PENDING)])
    assert plan.status["phase"] == "Queued"
    ready = _cond(plan, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "Queued"
    assert "insufficient unused quota for nvidia.com/gpu" in ready["message"]
    assert plan.requeue_after == rec.KUEUE_LOOK_AGAIN  # a Workload's change brings no event
    assert not plan.patches and not plan.create  # Kueue, not us, starts the Job


def test_until_kueue_has_said_anything_the_job_is_looked_at_again_soon():
    """The look right after the Job is created finds no Workload (Kueue makes it a moment
    later) or one without conditions: its placeholder reason is replaced within seconds."""
    for workloads in ([], [_workload()]):
        plan = _queued_run([_queued_job()], workloads=workloads)
        assert plan.status["phase"] == "Queued"
        assert plan.requeue_after == rec.KUEUE_FIRST_LOOK < rec.KUEUE_LOOK_AGAIN


def test_without_kueue_a_queued_job_says_so_at_once_and_is_looked_at_slowly():
    """Kueue's Workload API not served (404): the job says Kueue is missing, written at once
    (not held as "Kueue has said nothing yet"), and looked at again at the slow pace."""
    reason, message = rec.kueue_wait(None, served=False)
    assert reason == "Queued" and "kueue.x-k8s.io/v1beta2" in message and \
        "is Kueue installed?" in message
    assert rec.kueue_said(None, served=False)
    job = _queued_job()
    job["metadata"]["creationTimestamp"] = "2026-11-28T12:00:00Z"
    plan = _queued_run([job], now=NOW + timedelta(seconds=0.5), kueue_served=False)
    assert plan.status["phase"] == "Queued" and plan.status["startTime"]
    ready = _cond(plan, "Ready")
    assert ready["reason"] == "Queued" and ready["message"] == rec.KUEUE_NOT_SERVED
    assert plan.requeue_after == rec.KUEUE_LOOK_AGAIN
    assert not plan.patches and not plan.create  # the Job stays suspended, for Kueue
    # Kueue installed later: its Workload's word replaces it.
    served = _queued_run([job], workloads=[_workload(PENDING)])
    assert "insufficient unused quota" in _cond(served, "Ready")["message"]


def test_a_preempted_attempt_waits_again_without_counting_as_a_failure():
    """Kueue preempts by suspending the Job (its pod checkpoints and stops): the same attempt
    waits to be admitted again; nothing counts against retries, no new attempt starts."""
    body_status = {"phase": "Running", "attempts": [
        {"number": 0, "jobName": "quickstart-lora-0", "reason": "Running"}]}
    stopped = _pod("quickstart-lora-0", "Failed", exit_code=0,
                   message='{"status":"Preempted","message":"SIGTERM: checkpoint at step 40"}')
    body = _body(scheduling={"queueName": "team-a"}, retryPolicy={"maxRetries": 0})
    body["status"] = body_status
    world = rec.Observed(body, parse(body), [], [_queued_job()], [stopped], None, None,
                         workloads=[_workload(PREEMPTED, PENDING)])
    plan = rec.reconcile(world, SETTINGS, NOW)
    assert plan.status["phase"] == "Queued"
    assert _cond(plan, "Ready")["reason"] == "Preempted"
    assert _cond(plan, "Running")["status"] == "False"
    assert plan.status["retries"] == 0
    assert [a["reason"] for a in plan.status["attempts"]] == ["Preempted"]
    assert "countsAgainstRetries" not in plan.status["attempts"][0]
    assert not plan.create and not plan.patches
    assert any(r == "Queued" and "Preempted" in m for _, r, m in plan.events), plan.events


def test_suspending_a_queued_job_deactivates_its_workload_not_the_job():
    running = _queued_job(suspend=False)
    plan = _queued_run([running], [_pod("quickstart-lora-0")], [_workload(RESERVED)],
                       scheduling={"suspend": True})
    assert [(o["kind"], p) for o, p in plan.patches] == [
        ("Workload", {"spec": {"active": False}})]
    assert any(r == "Suspending" for _, r, _ in plan.events)
    # Once deactivated (Kueue suspended the Job), it stays as it is: nothing more to patch.
    plan = _queued_run([_queued_job()], [], [_workload(PENDING, active=False)],
                       scheduling={"suspend": True})
    assert not plan.patches and plan.status["phase"] == "Suspended"
    # Resumed: the Workload is activated again and queues; the Job is left to Kueue. The
    # status says so at once (not the deactivated Workload it observed), and the next look
    # comes soon, for Kueue's word.
    plan = _queued_run([_queued_job()], [], [_workload(PENDING, active=False)])
    assert [(o["kind"], p) for o, p in plan.patches] == [
        ("Workload", {"spec": {"active": True}})]
    assert any(r == "Resuming" for _, r, _ in plan.events)
    ready = _cond(plan, "Ready")
    assert plan.status["phase"] == "Queued" and ready["reason"] == "Queued"
    assert ready["message"] == rec.KUEUE_ACTIVATED and "deactivated" not in ready["message"]
    [attempt] = plan.status["attempts"]
    assert attempt["reason"] == "Queued" and attempt["message"] == rec.KUEUE_ACTIVATED
    assert plan.requeue_after == rec.KUEUE_FIRST_LOOK


class _Kube:
    def __init__(self):
        self.selectors = []

    def workloads(self, ns, selector):
        self.selectors.append((ns, selector))
        return []


@pytest.mark.parametrize("job, suspend_wanted, asked", [
    (_queued_job(suspend=True), False, True),  # held by Kueue: why
    (_queued_job(suspend=False), False, False),  # running: nothing to ask (no LIST per step)
    (_queued_job(suspend=False), True, True),  # to be suspended: its Workload is patched
    (_job(0, suspend=True), False, False),  # suspended by us, not queued
])
def test_workloads_are_read_only_when_a_decision_needs_them(job, suspend_wanted, asked):
    from kubetune_operator.controller import FineTuneJobController

    ctl = FineTuneJobController.__new__(FineTuneJobController)
    ctl.kube = _Kube()
    spec = parse(_body(scheduling={"queueName": "team-a", "suspend": suspend_wanted}))
    ctl._workloads("ml", [job], spec)
    assert bool(ctl.kube.selectors) == asked
    if asked:
        assert ctl.kube.selectors == [("ml", f"{res.KUEUE_JOB_UID} in (job-uid-0)")]


def test_the_dev_clusters_kueue_registers_only_the_webhooks_it_serves():
    upstream = [{"apiVersion": "admissionregistration.k8s.io/v1",
                 "kind": "MutatingWebhookConfiguration",
                 "metadata": {"name": "mutating-webhook-configuration"},
                 "webhooks": [{"name": n, "clientConfig": {"service": {
                     "name": "webhook-service", "namespace": "system", "path": p}},
                     "failurePolicy": "Fail"} for n, p in (
                     ("mjob.kb.io", "/mutate-batch-v1-job"),
                     ("mpod.kb.io", "/mutate--v1-pod"),
                     ("mworkload.kb.io", "/mutate-kueue-x-k8s-io-v1beta2-workload"),
                     ("mrayjob.kb.io", "/mutate-ray-io-v1-rayjob"))]}]
    [out] = kueue.webhook_configurations(upstream, 9443, b"PEM")
    assert out["metadata"]["name"] == kueue.MUTATING
    assert [h["name"] for h in out["webhooks"]] == ["mjob.kb.io", "mworkload.kb.io"]
    assert out["webhooks"][0]["clientConfig"] == {
        "url": "https://127.0.0.1:9443/mutate-batch-v1-job", "caBundle": "UEVN"}
    assert out["webhooks"][0]["failurePolicy"] == "Fail"  # upstream's, unchanged
    cfg = kueue.config(9443, 8081, Path("/c"))
    assert cfg["integrations"]["frameworks"] == ["batch/job"]
    assert cfg["manageJobsWithoutQueueName"] is False
    assert cfg["webhook"] == {"host": "127.0.0.1", "port": 9443, "certDir": "/c"}
