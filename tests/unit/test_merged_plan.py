"""The pure merged-mode plan: merge Job, switch, rollout watch, rollback of a live Deployment
and restore on delete, each decided from an observed world (no cluster)."""

from __future__ import annotations

import copy

import pytest

from kubetune_operator.cache import pod_view
from kubetune_operator.reconcile import loraadapter as la
from kubetune_operator.reconcile import merged as rec

pytestmark = pytest.mark.unit
DIGEST = "ab" * 32
OUT = "s3://bkt/x-merged"
BASE = "builtin://tiny-llama"


def verified() -> la.Verification:
    return la.Verification(True, "Verified", "", "s3://bkt/x", DIGEST, "LoRA", 8, BASE)


def deployment(model=BASE, holder=None, previous=None, rolled_back=None, replicas=2,
               updated=2, available=2, generation=3, observed=3, deadline=False) -> dict:
    annotations = {"deployment.kubernetes.io/revision": "4"}
    for key, value in ((rec.ADAPTER, holder), (rec.PREVIOUS, previous),
                       (rec.ROLLED_BACK, rolled_back)):
        if value is not None:
            annotations[key] = value
    conditions = [{"type": "Progressing", "status": "False" if deadline else "True",
                   "reason": "ProgressDeadlineExceeded" if deadline else
                   "NewReplicaSetAvailable", "message": "rs too slow" if deadline else ""}]
    return {"metadata": {"name": "srv", "namespace": "ns", "generation": generation,
                         "annotations": annotations, "labels": {}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "srv"}},
                     "template": {"spec": {"containers": [
                         {"name": "server", "args": ["--model", model, "--port", "8000"]},
                         {"name": "sidecar", "image": "x"}]}}},
            "status": {"observedGeneration": observed, "updatedReplicas": updated,
                       "availableReplicas": available, "replicas": replicas,
                       "conditions": conditions}}


def pod(name="srv-1", model=OUT, restarts=0, waiting=None, exit_code=None, message=None,
        unschedulable=None, labels=None) -> dict:
    """A real pod object, reduced by the serving cache's own view."""
    status = {"phase": "Running", "podIP": "10.0.0.1", "conditions": [],
              "containerStatuses": [{
                  "name": "server", "restartCount": restarts,
                  "state": {"waiting": {"reason": waiting}} if waiting else {"running": {}},
                  "lastState": {"terminated": {"exitCode": exit_code, "message": message}}
                  if exit_code is not None else {}}]}
    if unschedulable:
        status["conditions"].append({"type": "PodScheduled", "status": "False",
                                     "reason": "Unschedulable", "message": unschedulable})
    return pod_view({"metadata": {"name": name, "namespace": "ns",
                                  "labels": labels or {"app": "srv"}},
                     "spec": {"containers": [{"name": "server", "args": ["--model", model]}]},
                     "status": status})


def world(**kw) -> rec.MergedWorld:
    base = dict(name="a", namespace="ns", target="srv", verification=verified(),
                decision=la.Decision("load", "Serving", ""), deployment=deployment(),
                merged_ready=True, merge_job_name="a-merge-abababab")
    base.update(kw)
    return rec.MergedWorld(**base)


def job(*conditions, message="") -> dict:
    return {"metadata": {"name": "a-merge-abababab"}, "status": {"conditions": [
        {"type": c, "status": "True", "message": message} for c in conditions]}}


def detail_of(plan: rec.MergedPlan) -> str:
    """The failure a rollback names (between "failed (" and "); rolled back")."""
    return plan.state["message"].split(" failed (", 1)[1].rsplit("); rolled back", 1)[0]


def server_model(patch: dict) -> str | None:
    return rec.model_of(patch["spec"]["template"]["spec"]["containers"][0])


# ---- the merge ---------------------------------------------------------------------------
@pytest.mark.parametrize("kw,phase,reason,create,detail", [
    ({"merged_ready": False}, "Merging", "Merging", True, "merge Job created"),
    ({"merged_ready": False, "merge_job": job()}, "Merging", "Merging", False, "is running"),
    ({"merged_ready": False, "merge_job": job(),
      "merge_pods": [pod("m", unschedulable="0/3 nodes: Insufficient nvidia.com/gpu",
                         labels={"job-name": "a-merge-abababab"})]},
     "Merging", "Merging", False, "is unschedulable: 0/3 nodes: Insufficient nvidia.com/gpu"),
    ({"merged_ready": False, "merge_job": job("Failed", message="BackoffLimitExceeded"),
      "merge_pods": [pod("m", exit_code=1, message="loading\nValueError: base mismatch",
                         labels={"job-name": "a-merge-abababab"})]},
     "Failed", "MergeFailed", False, "failed: ValueError: base mismatch"),
    ({"merged_ready": False, "merge_job": job("Complete")}, "Merging", "Merging", False,
     "does not name this adapter's digest yet"),
])
def test_the_merge_job_is_created_once_and_its_outcome_read_back(kw, phase, reason, create,
                                                                 detail):
    p = rec.plan(world(**kw))
    assert (p.state["phase"], p.state["reason"], p.create_merge_job) == (phase, reason, create)
    assert detail in p.state["message"] and p.patch is None
    assert p.state["uri"] == OUT
    assert p.active == (phase == "Merging")
    if create:
        assert p.events == [("Normal", "Merging",
                             f"Created merge Job a-merge-abababab -> {OUT}")]


# ---- gates before touching the Deployment ------------------------------------------------
@pytest.mark.parametrize("kw,phase,reason", [
    ({"verification": la.Verification(False, "DigestMismatch", "x")}, "Pending",
     "ArtifactNotVerified"),
    ({"deployment": None}, "Failed", "TargetNotFound"),
    ({"opted_in": False}, "Failed", "TargetNotOptedIn"),
    ({"decision": la.Decision("unload", "NotPromoted", "")}, "Pending", "PromotionPending"),
    ({"decision": la.Decision("unload", "Superseded", "superseded by b", "b")}, "Superseded",
     "Superseded"),
    ({"deployment": deployment(holder="other"), "rivals": frozenset({"other"})}, "Failed",
     "TargetInUse"),
    ({"deployment": deployment(model=OUT, rolled_back=OUT, previous=BASE)}, "Failed",
     "RolledBack"),
    ({"container": "missing"}, "Failed", "TargetNotFound"),
])
def test_nothing_is_changed_until_the_adapter_may_hold_the_deployment(kw, phase, reason):
    p = rec.plan(world(**kw))
    assert (p.state["phase"], p.state["reason"]) == (phase, reason), p.state
    assert p.patch is None and not p.create_merge_job and not p.finalized


# ---- switch and watch --------------------------------------------------------------------
def test_the_switch_names_the_merged_model_where_the_model_was_and_remembers_the_previous():
    p = rec.plan(world())
    assert p.state["phase"] == "RollingOut" and p.active
    assert server_model(p.patch) == OUT
    assert p.patch["metadata"]["annotations"] == {rec.PREVIOUS: BASE, rec.ADAPTER: "a"}
    containers = p.patch["spec"]["template"]["spec"]["containers"]
    assert containers[1] == {"name": "sidecar", "image": "x"}  # the others as they are
    assert p.patch["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert p.patch["spec"]["progressDeadlineSeconds"] == 600


def test_a_new_version_of_the_same_adapter_keeps_the_original_previous_model():
    older = deployment(model="s3://bkt/old-merged", holder="a", previous=BASE)
    p = rec.plan(world(deployment=older))
    assert p.patch["metadata"]["annotations"][rec.PREVIOUS] == BASE
    other = deployment(model="s3://bkt/old-merged", holder="b", previous=BASE)
    p = rec.plan(world(deployment=other))  # b is a version of this alias handing over
    assert p.patch["metadata"]["annotations"][rec.PREVIOUS] == "s3://bkt/old-merged"


@pytest.mark.parametrize("dep,pods,phase,reason,detail", [
    (deployment(model=OUT, holder="a", previous=BASE), [pod()], "RolledOut", "RolledOut",
     "serves s3://bkt/x-merged on 2/2 replicas (revision 4)"),
    (deployment(model=OUT, holder="a", previous=BASE, updated=1), [pod()], "RollingOut",
     "RollingOut", "1/2 updated, 2 available"),
    (deployment(model=OUT, holder="a", previous=BASE, generation=4), [pod()], "RollingOut",
     "RollingOut", ""),  # the Deployment controller has not seen the switch yet
    # A crash-looping pod still on the old model is not the merged model's fault.
    (deployment(model=OUT, holder="a", previous=BASE, updated=1),
     [pod(model=BASE, restarts=5, waiting="CrashLoopBackOff")], "RollingOut", "RollingOut", ""),
])
def test_the_rollout_is_watched_until_every_replica_serves_the_merged_model(dep, pods, phase,
                                                                          reason, detail):
    p = rec.plan(world(deployment=dep, pods=pods))
    assert (p.state["phase"], p.state["reason"]) == (phase, reason)
    assert detail in p.state["message"] and p.patch is None
    assert p.state["revision"] == "srv@4"
    assert p.active == (phase == "RollingOut")


# ---- rollback of a live Deployment -------------------------------------------------------
@pytest.mark.parametrize("case,dep,pods,rollback,reason,restores,detail", [
    ("deadline", deployment(model=OUT, holder="a", previous=BASE, updated=1, deadline=True),
     [], True, "RolledBack", True, "progress deadline exceeded: rs too slow"),
    ("crash loop", deployment(model=OUT, holder="a", previous=BASE, updated=1),
     [pod(waiting="CrashLoopBackOff", restarts=1, exit_code=1, message="CUDA OOM")], True,
     "RolledBack", True, "pod srv-1 crash-loops with the merged model (1 restarts; last exit "
     "1: CUDA OOM)"),
    ("restarts", deployment(model=OUT, holder="a", previous=BASE, updated=1),
     [pod(restarts=2, exit_code=137)], True, "RolledBack", True, "2 restarts; last exit 137"),
    ("one restart", deployment(model=OUT, holder="a", previous=BASE, updated=1),
     [pod(restarts=1, exit_code=137)], True, "RollingOut", False, ""),
    ("rollback off", deployment(model=OUT, holder="a", previous=BASE, deadline=True), [],
     False, "RolloutFailed", False, "progress deadline exceeded"),
    ("no previous", deployment(model=OUT, holder="a", deadline=True), [], True,
     "RolloutFailed", False, "no previous model to restore"),
])
def test_a_failed_rollout_restores_the_previous_model(case, dep, pods, rollback, reason,
                                                      restores, detail):
    p = rec.plan(world(deployment=dep, pods=pods, rollback_on_failure=rollback))
    assert p.state["reason"] == reason, (case, p.state)
    assert detail in p.state["message"], (case, p.state["message"])
    if restores:
        assert server_model(p.patch) == BASE
        assert p.patch["metadata"]["annotations"] == {rec.ROLLED_BACK: OUT,
                                                      rec.ROLLBACK_REASON: detail_of(p)}
        assert p.state["phase"] == "Failed" and f"rolled back to {BASE}" in p.state["message"]
        # The next look sees the annotations: no second rollback, no switch back, and the
        # status still says why (it is rebuilt from the Deployment).
        after = copy.deepcopy(dep)
        after["metadata"]["annotations"].update(p.patch["metadata"]["annotations"])
        after["spec"]["template"]["spec"]["containers"][0]["args"][1] = BASE
        again = rec.plan(world(deployment=after, pods=pods, rollback_on_failure=rollback))
        assert again.patch is None and again.state["reason"] == "RolledBack"
        assert detail in again.state["message"], again.state["message"]
    else:
        assert p.patch is None


# ---- delete (a Git revert) ---------------------------------------------------------------
@pytest.mark.parametrize("dep,patched,model", [
    (None, False, None),
    (deployment(model="s3://other-merged", holder="b", previous=BASE), False, None),
    (deployment(model=OUT, holder="a", previous=BASE), True, BASE),
    (deployment(model=BASE, holder="a", previous=BASE, rolled_back=OUT), True, None),
])
def test_deleting_gives_the_deployment_its_previous_model_back(dep, patched, model):
    p = rec.plan(world(deleting=True, deployment=dep))
    assert p.finalized and (p.patch is not None) == patched
    if patched:
        assert p.patch["metadata"]["annotations"] == {
            rec.ADAPTER: None, rec.PREVIOUS: None, rec.ROLLED_BACK: None,
            rec.ROLLBACK_REASON: None}
        assert (server_model(p.patch) if "spec" in p.patch else None) == model
        assert p.events[0][1] == "Restored"


def test_the_pod_view_keeps_what_rollouts_read_and_is_bounded():
    view = pod(restarts=3, waiting="CrashLoopBackOff", exit_code=2, message="x" * 5000)
    (st,) = view["statuses"]
    assert st["restartCount"] == 3 and st["waiting"] == "CrashLoopBackOff"
    assert st["exitCode"] == 2 and len(st["message"]) == 1000
    assert view["models"] == {"server": OUT} and view["unschedulable"] is None


def test_pod_and_merge_job_events_reach_only_the_adapters_they_concern():
    """The serving cache takes every pod but training pods; a pod event queues the adapters
    whose selector it matches in its namespace; a merge Job event fills the cache and queues
    its adapter."""
    from kubetune_operator.adapters import LoRAAdapterController
    from kubetune_operator.settings import OperatorSettings

    controller = LoRAAdapterController(None, OperatorSettings())
    queued = []
    controller.queue.add = lambda key, delay=0.0: queued.append(key)
    controller._watch_pods(("ns", "a"), {"app": "srv"})
    controller._watch_pods(("other", "b"), {"app": "srv"})

    def raw(name, ns="ns", **labels):
        return {"metadata": {"name": name, "namespace": ns, "labels": labels,
                             "resourceVersion": "1"}, "spec": {"containers": []},
                "status": {}}
    controller.on_pod("ADDED", raw("srv-1", app="srv"))
    controller.on_pod("ADDED", raw("web-1", app="web"))
    controller.on_pod("ADDED", raw("train-0", app="srv", **{"kubetune.io/finetunejob": "j"}))
    assert queued == [("ns", "a")]
    assert [p["metadata"]["name"] for p in controller.serving.pods("ns", {"app": "srv"})] == \
        ["srv-1"]  # the training pod is not cached
    controller._watch_pods(("ns", "a"), None)
    controller.on_pod("MODIFIED", raw("srv-1", app="srv"))
    assert queued == [("ns", "a")]

    controller.adapters[("ns", "m")] = {"metadata": {"name": "m", "namespace": "ns"}}
    merge = {"metadata": {"name": "m-merge-abcd", "namespace": "ns", "resourceVersion": "2",
                          "labels": {"kubetune.io/loraadapter": "m"}}, "status": {}}
    controller.on_merge_job("ADDED", merge)
    assert controller.serving.job("ns", "m-merge-abcd") is merge and queued[-1] == ("ns", "m")
    controller.on_merge_job("DELETED", merge)
    assert controller.serving.job("ns", "m-merge-abcd") is None
