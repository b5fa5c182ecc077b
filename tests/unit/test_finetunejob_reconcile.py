"""The FineTuneJob reconcile and builders, pure: table tests with `now` passed in."""

from datetime import datetime, timedelta, timezone

import pytest
import yaml
from pathlib import Path

from kubetune.api.validation import parse
from kubetune_operator.reconcile import finetunejob as rec
from kubetune_operator.resources import finetunejob as res
from kubetune_operator.settings import OperatorSettings

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=timezone.utc)
SETTINGS = OperatorSettings(s3_endpoint="http://s3:8333", s3_credentials_secret="s3-creds")


def _body(example="finetunejob-lora.yaml", **spec):
    obj = yaml.safe_load((ROOT / "examples" / example).read_text())
    obj["metadata"].update(namespace="ml", uid="uid-1", generation=1)
    obj["spec"].update(spec)
    return obj


def _job(number, conditions=(), suspend=False, name="quickstart-lora"):
    return {"metadata": {"name": f"{name}-{number}", "labels": {res.LABEL_ATTEMPT: str(number)},
                         "creationTimestamp": "2026-11-28T11:00:00Z"},
            "spec": {"suspend": suspend},
            "status": {"conditions": [{"type": t, "status": "True", "reason": r, "message": m,
                                       "lastTransitionTime": "2026-11-28T11:50:00Z"}
                                      for t, r, m in conditions]}}


def _pod(job, phase="Running", exit_code=None, message=None, disruption=None, reason=None):
    pod = {"metadata": {"name": f"{job}-abc", "labels": {"batch.kubernetes.io/job-name": job},
                        "creationTimestamp": "2026-11-28T11:00:01Z"},
           "spec": {"nodeName": "gpu-0"}, "status": {"phase": phase, "conditions": []}}
    if exit_code is not None:
        pod["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": exit_code, "message": message, "reason": reason or "Error"}}}]
    if disruption:
        pod["status"]["conditions"].append({"type": "DisruptionTarget", "status": "True",
                                            "reason": disruption, "message": "disrupted"})
    return pod


def _run(body, jobs=(), pods=(), artifact=None, error=None, now=NOW):
    job = parse(body)
    return rec.reconcile(rec.Observed(body, job, rec.semantic_errors(body), list(jobs),
                                      list(pods), artifact, error), SETTINGS, now)


def _cond(plan, kind):
    return next(c for c in plan.status["conditions"] if c["type"] == kind)


def test_first_reconcile_creates_children_of_attempt_zero():
    plan = _run(_body())
    kinds = [o["kind"] for o in plan.create]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding", "Job"]
    assert plan.create[-1]["metadata"]["name"] == "quickstart-lora-0"
    # The attempt carries its own rendered config: a downward-API file from its annotation.
    template = plan.create[-1]["spec"]["template"]
    config = yaml.safe_load(template["metadata"]["annotations"]["kubetune.io/trainer-config"])
    assert config["logging"]["status"]["name"] == "quickstart-lora"
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == "config"]
    assert volume["downwardAPI"]["items"] == [{"path": "config.yaml", "fieldRef": {
        "fieldPath": "metadata.annotations['kubetune.io/trainer-config']"}}]
    args = template["spec"]["containers"][0]["args"]
    assert args[args.index("--config") + 1] == "/etc/kubetune/config.yaml"
    assert plan.create[-1]["metadata"]["annotations"] == {"kubetune.io/spec-generation": "1"}
    # no status yet: the first write waits for the attempt to say something (its pod runs)
    assert plan.status == {} and plan.requeue_after == pytest.approx(rec.START_WRITE_GRACE)
    assert plan.events == [("Normal", "CreatedJob", "Created Job quickstart-lora-0 (attempt 0)")]


def test_with_the_trainer_status_policy_the_first_attempt_needs_no_role_of_its_own():
    body = _body()
    shared = SETTINGS.model_copy(update={"trainer_rbac": "shared"})
    plan = rec.reconcile(rec.Observed(body, parse(body), [], [], [], None, None), shared, NOW)
    assert [o["kind"] for o in plan.create] == ["ServiceAccount", "RoleBinding", "Job"]
    assert plan.create[1]["metadata"]["name"] == "kubetune-trainers"


def test_a_config_too_large_for_the_pod_template_is_refused_naming_the_field():
    from kubetune_operator.settings import OperatorSettings

    body = _body()
    body["spec"]["dataset"]["chatTemplate"] = "\x01" * 65536  # YAML escapes each: 4 bytes
    with pytest.raises(ValueError, match="spec.dataset.chatTemplate"):
        res.trainer_config(parse(body), body, OperatorSettings())
    body["spec"]["dataset"]["chatTemplate"] = "{{ messages }}"
    assert len(res.trainer_config(parse(body), body, OperatorSettings())) < res.MAX_CONFIG_BYTES


CLASSIFY_TABLE = [
    ([("Failed", "PodFailurePolicy", "Pod has condition DisruptionTarget")],
     [_pod("quickstart-lora-0", "Failed", 143, disruption="PreemptionByScheduler")],
     "Preempted", False, False),
    ([("Failed", "PodFailurePolicy", "DisruptionTarget")],
     [_pod("quickstart-lora-0", "Failed", 143, disruption="DeletionByPodGC")],
     "NodeLost", False, False),
    ([("Failed", "PodFailurePolicy", "DisruptionTarget")],
     [_pod("quickstart-lora-0", "Failed", 143, disruption="EvictionByEvictionAPI")],
     "Evicted", False, False),
    ([("Failed", "PodFailurePolicy", "Container trainer exited with code 2")],
     [_pod("quickstart-lora-0", "Failed", 2,
           '{"status": "Failed", "reason": "InvalidInput", "message": "bad data"}')],
     "InvalidSpec", False, True),
    ([("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")],
     [_pod("quickstart-lora-0", "Failed", 137, reason="OOMKilled")], "OOMKilled", True, False),
    ([("Failed", "BackoffLimitExceeded", "backoff")],
     [_pod("quickstart-lora-0", "Failed", 1, '{"status": "Failed", "message": "boom"}')],
     "Error", True, False),
    ([("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")], [],
     "DeadlineExceeded", False, True),
    ([], [_pod("quickstart-lora-0", "Running")], "Running", False, False),
    ([], [], "Suspended", False, False),
]


@pytest.mark.parametrize("conditions,pods,reason,counts,terminal", CLASSIFY_TABLE)
def test_attempt_classification(conditions, pods, reason, counts, terminal):
    attempt = rec.classify(_job(0, conditions, suspend=reason == "Suspended"), pods)
    assert (attempt.reason, attempt.counts, attempt.terminal) == (reason, counts, terminal)


@pytest.mark.parametrize("conditions,pods,reason,counts,terminal", CLASSIFY_TABLE)
def test_the_cached_views_of_jobs_and_pods_classify_as_the_whole_objects(
        conditions, pods, reason, counts, terminal):
    """The FineTuneJob's cache keeps views of its Jobs and pods (no pod template, trainer
    config or managedFields): every attempt reads the same from them."""
    import copy

    from kubetune_operator.cache import job_view, trainer_pod_view

    body = _body()
    job = res.training_job(parse(body), body, 0, SETTINGS, reason == "Suspended")
    job["metadata"].update(uid="job-uid", resourceVersion="7", managedFields=[{"manager": "m"}],
                           creationTimestamp="2026-11-28T11:00:00Z")
    job["status"] = _job(0, conditions)["status"]
    whole = [copy.deepcopy(p) for p in pods]
    for pod in whole:
        pod["metadata"].update(uid="pod-uid", managedFields=[{"manager": "kubelet"}],
                               annotations=job["spec"]["template"]["metadata"]["annotations"],
                               ownerReferences=[{"uid": "job-uid", "controller": True}])
        pod["spec"].update(job["spec"]["template"]["spec"])
    view, views = job_view(job), [trainer_pod_view(p) for p in whole]
    assert "template" not in view["spec"] and "managedFields" not in view["metadata"]
    assert all(set(v["spec"]) == {"nodeName"} and "annotations" not in v["metadata"]
               and "managedFields" not in v["metadata"] for v in views)
    full, seen = rec.classify(job, whole), rec.classify(view, views)
    assert (seen.reason, seen.counts, seen.terminal) == (reason, counts, terminal)
    assert vars(seen) == vars(full)
    assert rec.observe_attempts([view], views, {}).history == \
        rec.observe_attempts([job], whole, {}).history


def test_disruption_retries_immediately_without_counting():
    jobs = [_job(0, [("Failed", "PodFailurePolicy", "DisruptionTarget")])]
    pods = [_pod("quickstart-lora-0", "Failed", 143, disruption="PreemptionByScheduler")]
    plan = _run(_body(), jobs, pods)
    assert plan.create[-1]["metadata"]["name"] == "quickstart-lora-1"
    assert plan.status["retries"] == 0
    assert plan.status["attempts"][0]["countsAgainstRetries"] is False


def test_counted_failure_waits_for_backoff_then_retries():
    jobs = [_job(0, [("Failed", "BackoffLimitExceeded", "x")])]
    pods = [_pod("quickstart-lora-0", "Failed", 1)]
    body = _body(retryPolicy={"maxRetries": 3, "backoffSeconds": 60, "maxBackoffSeconds": 600})
    early = datetime(2026, 11, 28, 11, 50, 10, tzinfo=timezone.utc)
    settings_less = rec.reconcile(rec.Observed(body, parse(body), [], jobs, pods),
                                  OperatorSettings(), early)
    assert not any(o["kind"] == "Job" for o in settings_less.create)
    assert settings_less.requeue_after == pytest.approx(50, abs=1)  # finished 11:50, +60s
    assert _cond(settings_less, "Ready")["reason"] == "RetryBackoff"
    later = rec.reconcile(rec.Observed(body, parse(body), [], jobs, pods),
                          OperatorSettings(), early + timedelta(seconds=60))
    assert later.create[-1]["metadata"]["name"] == "quickstart-lora-1"


def test_retries_exhausted_is_backoff_limit_exceeded():
    body = _body(retryPolicy={"maxRetries": 1})
    jobs = [_job(i, [("Failed", "BackoffLimitExceeded", "x")]) for i in range(2)]
    pods = [_pod(f"quickstart-lora-{i}", "Failed", 1) for i in range(2)]
    plan = _run(body, jobs, pods)
    assert plan.status["phase"] == "Failed"
    assert _cond(plan, "Failed")["reason"] == "BackoffLimitExceeded"
    assert not any(o["kind"] == "Job" for o in plan.create)


def test_success_asks_for_verification_then_publishes_and_creates_adapter_once():
    jobs = [_job(0, [("Complete", "CompletionsReached", "")])]
    summary = ('{"status": "Succeeded", "artifact": {"uri": "s3://b/a/adapter", '
               '"manifestSha256": "' + "a" * 64 + '"}, "metrics": {"steps": 10}}')
    pods = [_pod("quickstart-lora-0", "Succeeded", 0, summary)]
    first = _run(_body(), jobs, pods)
    assert first.verify_attempt is not None and first.verify_attempt.summary["artifact"]
    artifact = {"uri": "s3://b/a/adapter", "manifestSha256": "a" * 64, "method": "LoRA",
                "baseModelUri": "builtin://tiny-llama", "baseModelRevision": "v1"}
    done = _run(_body(), jobs, pods, artifact=artifact)
    assert done.status["phase"] == "Succeeded"
    adapter = next(o for o in done.create if o["kind"] == "LoRAAdapter")
    assert adapter["spec"]["source"]["sha256"] == "a" * 64
    assert adapter["spec"]["servingName"] == "quickstart" and "ownerReferences" not in \
        adapter["metadata"]
    bad = _run(_body(), jobs, pods, error="manifest missing")
    assert bad.status["phase"] == "Failed"
    assert _cond(bad, "ArtifactPublished")["reason"] == "ArtifactInvalid"


def test_unschedulable_and_suspend():
    pod = _pod("quickstart-lora-0", "Pending")
    pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "False",
                                    "reason": "Unschedulable", "message": "0/4 nodes: GPUs"}]
    plan = _run(_body(), [_job(0)], [pod])
    assert _cond(plan, "Ready")["reason"] == "Unschedulable"
    assert _cond(plan, "Ready")["message"] == "0/4 nodes: GPUs"
    plan = _run(_body(scheduling={"suspend": True}), [_job(0)], [_pod("quickstart-lora-0")])
    assert plan.patches and plan.patches[0][1] == {"spec": {"suspend": True}}


def _look(body, jobs=(), pods=(), now=NOW):
    """One reconcile as the controller applies it: its status written (when it changes
    anything) into `body`. Returns the plan and whether it wrote."""
    from kubetune_operator.controller import _changed

    plan = _run(body, jobs, pods, now=now)
    wrote = bool(plan.status) and _changed(body.get("status") or {}, plan.status)
    if wrote:
        body["status"] = {**(body.get("status") or {}), **plan.status}
    return plan, wrote


def _seen(plan, uid="job-uid-0", created="2026-11-28T12:00:00Z"):
    """The plan's Job as the watch brings it: with its uid and creationTimestamp."""
    job = next(o for o in plan.create if o["kind"] == "Job")
    return {**job, "metadata": {**job["metadata"], "uid": uid, "creationTimestamp": created}}


def _owned(pod, uid="job-uid-0"):
    pod["metadata"]["ownerReferences"] = [{"kind": "Job", "uid": uid, "controller": True}]
    return pod


@pytest.mark.parametrize("scheduling", [{}, {"queueName": "team-a"}])
def test_the_first_look_creates_the_job_writes_no_status_and_looks_again_at_the_grace(
        scheduling):
    first = _run(_body(scheduling=scheduling))
    assert [o["kind"] for o in first.create][-1] == "Job"
    assert first.status == {} and not first.patches
    assert first.requeue_after == pytest.approx(rec.START_WRITE_GRACE)
    assert [reason for _, reason, _ in first.events] == ["CreatedJob"]


def test_a_pod_running_within_the_grace_is_one_write_with_phase_running_and_start_time():
    """Created, seen, pod scheduled, pod running: one status write, and it says Running."""
    body = _body()
    writes = []
    created, wrote = _look(body)
    writes.append(wrote)
    job = _seen(created)
    pending = _owned(_pod("quickstart-lora-0", "Pending"))
    running = _owned(_pod("quickstart-lora-0", "Running"))
    for at, pods in ((0.4, []), (0.8, [pending]), (1.2, [running]), (1.6, [running])):
        plan, wrote = _look(body, [job], pods, NOW + timedelta(seconds=at))
        writes.append(wrote)
        if at == 0.8:
            assert plan.status == {} and plan.requeue_after == pytest.approx(1.2)
            assert not plan.events
        if at == 1.2:
            assert [e[1:] for e in plan.events] == [
                ("Running", "Phase None -> Running: pod quickstart-lora-0-abc on gpu-0")]
    assert writes == [False, False, False, True, False]
    st = body["status"]
    assert st["phase"] == "Running" and st["startTime"] == "2026-11-28T12:00:00Z"
    assert st["attempts"] == [{"number": 0, "jobName": "quickstart-lora-0", "reason": "Running",
                               "startedAt": "2026-11-28T12:00:00Z",
                               "message": "pod quickstart-lora-0-abc on gpu-0"}]
    assert _cond(plan, "Running")["status"] == "True"


def test_the_grace_passed_with_the_pod_pending_writes_pending_then_running():
    body = _body()
    job = _seen(_look(body)[0])
    pending = _owned(_pod("quickstart-lora-0", "Pending"))
    plan, wrote = _look(body, [job], [pending], NOW + timedelta(seconds=rec.START_WRITE_GRACE))
    assert wrote and body["status"]["phase"] == "Pending"
    assert body["status"]["startTime"] == "2026-11-28T12:00:00Z"
    assert not plan.events  # "Created Job …" said it
    plan, wrote = _look(body, [job], [_owned(_pod("quickstart-lora-0"))], NOW + timedelta(
        seconds=9))
    assert wrote and body["status"]["phase"] == "Running"
    assert [e[1] for e in plan.events] == ["Running"]


def test_an_attempt_with_something_to_say_is_written_within_the_grace():
    """Unschedulable, stuck pulling its image, or suspended by the user: said at once."""
    soon = NOW + timedelta(seconds=0.5)
    unschedulable = _owned(_pod("quickstart-lora-0", "Pending"))
    unschedulable["status"]["conditions"] = [{"type": "PodScheduled", "status": "False",
                                              "reason": "Unschedulable", "message": "0/4"}]
    stuck = _owned(_pod("quickstart-lora-0", "Pending"))
    stuck["status"]["containerStatuses"] = [{"name": "trainer", "state": {"waiting": {
        "reason": "ErrImagePull", "message": "no such image"}}}]
    for pod in (unschedulable, stuck):
        body = _body()
        plan, wrote = _look(body, [_seen(_run(body))], [pod], soon)
        assert wrote and plan.status["phase"] == "Pending", pod
    body = _body(scheduling={"suspend": True})
    plan, wrote = _look(body)
    assert wrote and plan.status["phase"] == "Suspended" and plan.status["startTime"]
    # the look its own create brings finds nothing to write (the Job stamped a second later)
    _, wrote = _look(body, [_seen(plan, created="2026-11-28T12:00:01Z")], [], soon)
    assert not wrote


def test_a_spec_changed_before_the_start_was_recorded_restarts_the_attempt_uncounted():
    """Generation 2 while attempt 0's Job was built from 1 and no start is recorded: the Job is
    deleted (one Event), nothing counts, and once it is gone attempt 0 starts from the new
    spec, blind to the old Job's pods."""
    body = _body()
    old = _seen(_run(body), uid="old-uid")
    old_pod = _owned(_pod("quickstart-lora-0", "Running"), "old-uid")
    body["metadata"]["generation"] = 2
    body["spec"]["training"] = {**body["spec"].get("training", {}), "maxSteps": 7}
    plan, wrote = _look(body, [old], [old_pod], NOW + timedelta(seconds=1))
    assert plan.delete == [old] and not plan.create and not wrote
    assert [(kind, reason) for kind, reason, _ in plan.events] == [("Normal", "SpecChanged")]
    assert "generation 1" in plan.events[0][2] and "generation 2" in plan.events[0][2]
    deleting = {**old, "metadata": {**old["metadata"], "deletionTimestamp": "x"}}
    plan, wrote = _look(body, [deleting], [old_pod], NOW + timedelta(seconds=2))
    assert not plan.delete and not plan.events and not plan.create and not wrote
    restart, wrote = _look(body, [], [old_pod], NOW + timedelta(seconds=3))
    job = next(o for o in restart.create if o["kind"] == "Job")
    assert job["metadata"]["name"] == "quickstart-lora-0" and not wrote
    assert job["metadata"]["annotations"]["kubetune.io/spec-generation"] == "2"
    config = yaml.safe_load(job["spec"]["template"]["metadata"]["annotations"][
        "kubetune.io/trainer-config"])
    assert config["training"]["maxSteps"] == 7
    new = _seen(restart, uid="new-uid", created="2026-11-28T12:00:03Z")
    plan, wrote = _look(body, [new], [old_pod], NOW + timedelta(seconds=3.5))
    assert not wrote and plan.status == {}  # the old pod, still Running, is not the new Job's
    plan, wrote = _look(body, [new], [old_pod, _owned(_pod("quickstart-lora-0"), "new-uid")],
                        NOW + timedelta(seconds=4))
    assert wrote and body["status"]["retries"] == 0
    assert [a["number"] for a in body["status"]["attempts"]] == [0]


def test_once_the_start_is_recorded_a_newer_generation_leaves_the_attempt_running():
    """After startTime, admission keeps the training inputs; other edits (a newer generation)
    apply to later attempts and never stop this one."""
    body = _body()
    job = _seen(_run(body))
    _look(body, [job], [_owned(_pod("quickstart-lora-0"))], NOW + timedelta(seconds=1))
    assert body["status"]["startTime"]
    body["metadata"]["generation"] = 2
    plan, _ = _look(body, [job], [_owned(_pod("quickstart-lora-0"))], NOW + timedelta(seconds=5))
    assert not plan.delete and body["status"]["phase"] == "Running"


def test_a_pod_on_its_way_up_changes_no_status_and_a_stuck_one_says_why():
    """Job created, pod created, pod scheduled: one status (each change of message would be a
    status write of its own, a third of the apiserver's work for a burst of jobs); a pod stuck
    pulling its image says so."""
    unscheduled = _pod("quickstart-lora-0", "Pending")
    unscheduled["spec"] = {}
    scheduled = _pod("quickstart-lora-0", "Pending")
    scheduled["status"]["containerStatuses"] = [{"name": "trainer", "state": {
        "waiting": {"reason": "ContainerCreating"}}}]
    statuses = [_run(_body(), [_job(0)], pods).status
                for pods in ([], [unscheduled], [scheduled])]
    assert statuses[0] == statuses[1] == statuses[2]
    assert _cond(_run(_body(), [_job(0)], [scheduled]), "Ready")["message"] == \
        "waiting for the trainer pod to start"
    stuck = _pod("quickstart-lora-0", "Pending")
    stuck["status"]["containerStatuses"] = [{"name": "trainer", "state": {"waiting": {
        "reason": "ImagePullBackOff", "message": "Back-off pulling image \"x\""}}}]
    assert _cond(_run(_body(), [_job(0)], [stuck]), "Ready")["message"] == \
        'pod quickstart-lora-0-abc: ImagePullBackOff: Back-off pulling image "x"'


def test_condition_transition_time_moves_only_on_flip():
    from kubetune_operator.conditions import set_condition

    conds = []
    assert set_condition(conds, "Ready", False, "A", "m", 1, NOW)
    assert not set_condition(conds, "Ready", False, "A", "m", 1, NOW + timedelta(hours=1))
    assert set_condition(conds, "Ready", False, "B", "m", 1, NOW + timedelta(hours=1))
    assert conds[0]["lastTransitionTime"] == "2026-11-28T12:00:00Z"
    assert set_condition(conds, "Ready", True, "B", "m", 1, NOW + timedelta(hours=2))
    assert conds[0]["lastTransitionTime"] == "2026-11-28T14:00:00Z"


def test_multi_node_job_is_indexed_with_rendezvous():
    body = _body(resources={"nodes": 2, "gpusPerNode": 8})
    plan = _run(body)
    service = next(o for o in plan.create if o["kind"] == "Service")
    job = next(o for o in plan.create if o["kind"] == "Job")
    assert service["spec"]["clusterIP"] == "None"
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == "quickstart-lora-0"
    args = pod["containers"][0]["args"]
    assert "--nnodes=2" in args and "--nproc_per_node=8" in args
    assert "--node_rank=$(JOB_COMPLETION_INDEX)" in args
    assert "--master_addr=quickstart-lora-0-0.quickstart-lora-0" in args
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_ttl_deletes_finished_job_and_long_names_are_invalid():
    body = _body(ttlSecondsAfterFinished=10)
    body["metadata"]["name"] = "n" * 51
    plan = _run(body)
    assert plan.status["phase"] == "Failed" and not plan.create
    assert plan.requeue_after == pytest.approx(10)
    body["status"] = plan.status
    later = _run(body, now=NOW + timedelta(seconds=11))
    assert later.delete_self


@pytest.mark.parametrize("message", ['[1, 2]', '"text"', '{"metrics": [1], "message": 5}',
                                     '{"status": "Failed", "message": {"x": 1}, "reason": 7}',
                                     "not json at all"])
def test_a_malformed_termination_message_is_read_safely(message):
    """The termination message is written by the container: any shape is read without error
    and only typed fields reach the status."""
    failed = _job(0, [("Failed", "BackoffLimitExceeded", "failed")])
    attempt = rec.classify(failed, [_pod("quickstart-lora-0", "Failed", 1, message)])
    assert attempt.reason == "Error" and isinstance(attempt.message, str), attempt
    assert all(isinstance(v, str) for k, v in attempt.summary.items()
               if k in ("status", "reason", "message"))
    plan = _run(_body(), [failed], [_pod("quickstart-lora-0", "Failed", 1, message)])
    assert plan.status["attempts"][0]["reason"] == "Error"


@pytest.mark.parametrize("attempt, retries, max_retries, at, want", [
    # terminal causes stop whatever the budget
    (dict(terminal=True, reason="InvalidSpec", counts=False), 0, 3, 0, ("stop", "InvalidSpec")),
    # counted failures back off exponentially: 10 s, then 20 s
    (dict(counts=True, reason="Error"), 1, 3, 5, ("wait", "")),
    (dict(counts=True, reason="Error"), 1, 3, 10, ("now", "")),
    (dict(counts=True, reason="Error"), 2, 3, 15, ("wait", "")),
    (dict(counts=True, reason="Error"), 2, 3, 20, ("now", "")),
    # the budget used up
    (dict(counts=True, reason="OOMKilled"), 4, 3, 999, ("stop", "BackoffLimitExceeded")),
    # preemption never counts and never waits, whatever was used before
    (dict(counts=False, reason="Preempted"), 9, 3, 0, ("now", "")),
])
def test_retry_decision_table(attempt, retries, max_retries, at, want):
    body = _body(retryPolicy={"maxRetries": max_retries, "backoffSeconds": 10,
                              "maxBackoffSeconds": 600})
    failed = rec.Attempt(number=retries, job_name="j", state="Failed",
                         finished="2026-11-28T11:50:00Z", message="m", **attempt)
    decision = rec.retry_decision(parse(body), failed, retries, OperatorSettings(),
                                  datetime(2026, 11, 28, 11, 50, tzinfo=timezone.utc)
                                  + timedelta(seconds=at))
    assert (decision.action, decision.reason) == want, decision
    if decision.action == "wait":
        assert 0 < decision.wait_seconds <= 20
