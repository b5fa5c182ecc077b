"""How the FineTuneJob controller applies a plan: children created in waves (what a later
create needs exists first; one wave's creates in flight together), a look-alike child stops
what follows it, and Events never hold a reconcile up (no apiserver: the client is a stub)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from kubetune.api.validation import parse
from kubetune_operator.cache import Caches
from kubetune_operator.controller import (CONFLICT_LOOK_AGAIN, FineTuneJobController,
                                          creation_waves)
from kubetune_operator.kube import Kube, NotOwned
from kubetune_operator.reconcile import finetunejob as rec
from kubetune_operator.resources import finetunejob as res
from kubetune_operator.settings import OperatorSettings

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
SETTINGS = OperatorSettings(s3_endpoint="http://s3:8333", s3_credentials_secret="s3-creds")


def _body(nodes: int = 1) -> dict:
    obj = yaml.safe_load((ROOT / "examples" / "finetunejob-lora.yaml").read_text())
    obj["metadata"].update(namespace="ml", uid="uid-1", generation=1)
    obj["spec"].setdefault("resources", {})["nodes"] = nodes
    return obj


def _children(body: dict) -> list[dict]:
    job = parse(body)
    out = res.rbac(body)
    if job.spec.resources.nodes > 1:
        out.append(res.headless_service(body, 0))
    out.append(res.training_job(job, body, 0, SETTINGS, False,
                                res.trainer_config(job, body, SETTINGS)))
    return out


class _Kube:
    """Records each create: its start, end and thread; a create of `slow` kinds takes 0.2 s."""

    def __init__(self, fail: dict | None = None, slow=("RoleBinding", "Job", "Service")):
        self.calls, self.events, self.fail, self.slow = [], [], fail or {}, slow
        self.lock = threading.Lock()

    def create(self, obj):
        start = time.monotonic()
        if obj["kind"] in self.slow:
            time.sleep(0.2)
        with self.lock:
            self.calls.append((obj["kind"], start, time.monotonic()))
        if obj["kind"] in self.fail:
            raise self.fail[obj["kind"]]
        return True

    def event(self, body, kind, reason, message):
        self.events.append((kind, reason, message))

    def patch_status(self, *args, **kwargs):
        self.statuses = getattr(self, "statuses", []) + [args]
        return True


def _controller(kube) -> FineTuneJobController:
    return FineTuneJobController(kube, SETTINGS, Caches())


def _apply(controller, body, children):
    plan = rec.Plan(create=children, status={}, events=[])
    log = SimpleNamespace(info=lambda *a, **k: None, warning=lambda *a, **k: None)
    controller._apply(("ml", body["metadata"]["name"]), body, plan, log)


@pytest.mark.parametrize("nodes", [1, 2])
def test_children_come_in_two_waves_account_and_role_first(nodes):
    waves = creation_waves(_children(_body(nodes)))
    assert [sorted(o["kind"] for o in w) for w in waves] == [
        ["Role", "ServiceAccount"],
        sorted(["RoleBinding", "Job"] + (["Service"] if nodes > 1 else []))]


def test_a_waves_creates_run_together_and_start_after_the_wave_before():
    kube = _Kube()
    body = _body(2)
    _apply(_controller(kube), body, _children(body))
    first = {k: (s, e) for k, s, e in kube.calls if k in ("ServiceAccount", "Role")}
    second = {k: (s, e) for k, s, e in kube.calls if k not in first}
    assert set(second) == {"RoleBinding", "Service", "Job"}
    assert min(s for s, _ in second.values()) >= max(e for _, e in first.values())
    # three 0.2 s creates together: all started before any ended
    assert max(s for s, _ in second.values()) < min(e for _, e in second.values())


def test_a_look_alike_role_stops_the_binding_and_the_job_and_says_so():
    kube = _Kube(fail={"Role": NotOwned("Role ml/x-trainer already exists")})
    controller = _controller(kube)
    body = _body()
    _apply(controller, body, _children(body))
    assert {k for k, _, _ in kube.calls} == {"ServiceAccount", "Role"}
    assert kube.events and kube.events[0][1] == "ChildConflict"
    assert controller.caches.jobs.children(("ml", body["metadata"]["name"])) == []
    [(_, _, _, status)] = kube.statuses
    assert [(c["reason"], c["message"]) for c in status["conditions"]] == [
        ("ChildConflict", "Role ml/x-trainer already exists")]


def test_a_failed_create_is_raised_after_its_wave_ends_and_nothing_follows():
    kube = _Kube(fail={"ServiceAccount": RuntimeError("apiserver said 500")})
    body = _body()
    with pytest.raises(RuntimeError, match="500"):
        _apply(_controller(kube), body, _children(body))
    assert {k for k, _, _ in kube.calls} == {"ServiceAccount", "Role"}


def test_a_refused_create_is_said_in_status_and_one_event_and_retried():
    """An admission policy or a quota refuses the Job: the job says why (Ready=False,
    CreateRefused, the apiserver's own message), one Warning Event per new message however
    often the back-off retries, and the error goes on to the back-off."""
    from kubernetes.client.rest import ApiException

    refused = ApiException(status=403, reason="Forbidden")
    refused.body = ('{"kind": "Status", "message": "jobs.batch \\"quickstart-lora-0\\" is '
                    'forbidden: exceeded quota: no-jobs, requested: count/jobs.batch=1"}')
    kube = _Kube(fail={"Job": refused})
    controller = _controller(kube)
    body = _body()
    from kubetune_operator.runner import Reported

    for _ in range(3):
        with pytest.raises(Reported) as raised:  # already said: one log line per retry
            _apply(controller, body, _children(body))
        assert raised.value.__cause__ is refused
    [(kind, reason, message)] = kube.events
    assert (kind, reason) == ("Warning", "CreateRefused")
    assert message.startswith("creating Job quickstart-lora-0 was refused by the apiserver "
                              "(403): jobs.batch")
    assert "exceeded quota: no-jobs" in message
    [(_, ns, name, status)] = kube.statuses  # written once: the retries said nothing new
    assert (ns, name) == ("ml", "quickstart-lora")
    assert status["phase"] == "Pending" and status["observedGeneration"] == 1
    [ready] = status["conditions"]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False",
                                                                "CreateRefused")
    assert ready["message"] == message
    # A server error (or throttling) is retried without a word: it may mend itself.
    for transient in (ApiException(status=500, reason="Internal"),
                      ApiException(status=429, reason="TooManyRequests")):
        kube = _Kube(fail={"Job": transient})
        with pytest.raises(ApiException):
            _apply(_controller(kube), _body(), _children(_body()))
        assert not kube.events and not getattr(kube, "statuses", [])


def _stub_kube(send):
    kube = Kube(SimpleNamespace())  # no server: its one request method is replaced below

    def request(method, kind, namespace=None, name=None, **kwargs):
        assert (method, kind, name) == ("POST", "Event", None)
        return send(namespace, kwargs["body"])

    kube._request = request
    return kube


def test_events_are_sent_in_the_background_in_order_and_flushed_on_demand():
    gate, sent = threading.Event(), []

    def send(namespace, event):
        gate.wait(5)
        sent.append((namespace, event["reason"], event["involvedObject"]["name"]))
        return {}

    kube = _stub_kube(send)
    body = _body()
    t0 = time.monotonic()
    kube.event(body, "Normal", "CreatedJob", "Created Job x-0")
    body["metadata"]["name"] = "renamed"  # built when recorded, not when sent
    kube.event(body, "Normal", "Running", "Phase Pending -> Running")
    assert time.monotonic() - t0 < 0.5 and sent == []  # the caller never waited
    assert kube.flush_events(0.2) is False
    gate.set()
    assert kube.flush_events(5) is True
    assert sent == [("ml", "CreatedJob", "quickstart-lora"), ("ml", "Running", "renamed")]
    assert kube.requests["event"] == 2


def test_a_full_event_backlog_drops_new_events_and_counts_them(monkeypatch):
    import kubetune_operator.kube as kube_mod

    monkeypatch.setattr(kube_mod, "EVENT_BACKLOG", 2)
    gate = threading.Event()

    def send(namespace, event):
        gate.wait(5)
        raise RuntimeError("apiserver down")  # a failed Event is dropped, not retried

    kube = _stub_kube(send)
    body = _body()
    for i in range(6):
        kube.event(body, "Normal", "R", str(i))
    gate.set()
    assert kube.flush_events(5) is True
    assert kube.requests["event_dropped"] >= 3
    assert kube.requests["event"] + kube.requests["event_dropped"] == 6


def test_kopf_gets_no_diff_base_and_every_handler_only_watches_events():
    """The operator replaces kopf's diff base (a deep copy and a diff of every object on every
    event) with nothing; that is right only while no handler is a change handler."""
    import kopf

    from kubetune_operator.adapters import LoRAAdapterController
    from kubetune_operator.handlers import NoDiffBase, registered_only_event_handlers
    from kubetune_operator.handlers import finetunejob as ftj_handlers
    from kubetune_operator.handlers import loraadapter as adapter_handlers

    registry = kopf.OperatorRegistry()
    caches = Caches()
    ftj_handlers.register(registry, FineTuneJobController(_Kube(), SETTINGS, caches))
    adapter_handlers.register(registry, LoRAAdapterController(_Kube(), SETTINGS,
                                                              caches.finetunejobs))
    assert registry._watching.get_all_handlers()
    assert registered_only_event_handlers(registry)

    @kopf.on.update("kubetune.io", "v1alpha1", "finetunejobs", registry=registry)
    def changed(**_):
        pass

    assert not registered_only_event_handlers(registry)
    storage = NoDiffBase()
    pod = {"metadata": {"name": "p", "annotations": {"kubetune.io/trainer-config": "x" * 9000}}}
    assert storage.build(body=pod) == {} and storage.fetch(body=pod) is None


SHARED = SETTINGS.model_copy(update={"trainer_rbac": "shared"})


def test_with_the_trainer_status_policy_a_job_gets_an_account_and_its_namespace_one_binding():
    body = _body()
    children = res.rbac(body, shared=True)
    account, binding = children
    assert account["kind"] == "ServiceAccount"
    assert account["metadata"]["name"] == f"{body['metadata']['name']}-trainer"
    assert account["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert binding["kind"] == "RoleBinding" and binding["metadata"]["name"] == \
        "kubetune-trainers" and "ownerReferences" not in binding["metadata"]
    assert binding["subjects"] == [{"kind": "Group", "apiGroup": "rbac.authorization.k8s.io",
                                    "name": "system:serviceaccounts:ml"}]
    assert binding["roleRef"]["kind"] == "ClusterRole"
    job = parse(body)
    training = res.training_job(job, body, 0, SHARED, False,
                                res.trainer_config(job, body, SHARED))
    waves = creation_waves(children + [training])
    assert [sorted(o["kind"] for o in w) for w in waves] == [
        ["RoleBinding", "ServiceAccount"], ["Job"]]


def test_the_namespace_binding_is_created_once_for_many_jobs_and_again_after_ten_minutes(
        monkeypatch):
    import kubetune_operator.controller as ctl

    kube = _Kube(slow=())
    controller = FineTuneJobController(kube, SHARED, Caches())
    clock = [1000.0]
    monkeypatch.setattr(ctl.time, "monotonic", lambda: clock[0])
    for name in ("a", "b", "c"):
        body = _body()
        body["metadata"].update(name=name, uid=f"uid-{name}")
        _apply(controller, body, res.rbac(body, shared=True))
    kinds = [k for k, _, _ in kube.calls]
    assert kinds.count("RoleBinding") == 1 and kinds.count("ServiceAccount") == 3
    clock[0] += ctl.NAMESPACE_BINDING_RECHECK
    _apply(controller, body, res.rbac(body, shared=True))
    assert [k for k, _, _ in kube.calls].count("RoleBinding") == 2



class _Writes(_Kube):
    """Also records status writes (with the resourceVersion they were conditional on) and
    deletes; `conflict`: each status write meets a newer object."""

    def __init__(self, conflict=False):
        super().__init__(slow=())
        self.writes, self.deletes, self.conflict = [], [], conflict

    def patch_status(self, kind, ns, name, status, resource_version=None):
        self.writes.append((status, resource_version))
        return not self.conflict

    def delete(self, obj):
        self.deletes.append(obj)


KEY = ("ml", "quickstart-lora")


def _started(kube, monkeypatch):
    """A controller that has reconciled a new FineTuneJob once (resourceVersion 10), and the
    delays of the looks again it asked for."""
    controller = _controller(kube)
    delays = []
    monkeypatch.setattr(controller.queue, "add", lambda key, delay=0.0: delays.append(delay))
    body = _body()
    body["metadata"]["resourceVersion"] = "10"
    controller._reconcile(KEY, body)
    return controller, body, delays


def _watch(controller, pod_phase="Running"):
    """What the watch brings next: the created Job (uid, creationTimestamp) and its pod."""
    from datetime import datetime, timezone

    (job,) = controller.caches.jobs.children(KEY)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    controller.caches.jobs.put(KEY, {**job, "metadata": {
        **job["metadata"], "uid": "job-uid", "resourceVersion": "11", "creationTimestamp": stamp}})
    controller.caches.pods.put(KEY, {
        "metadata": {"name": "quickstart-lora-0-abc", "resourceVersion": "12",
                     "labels": {"batch.kubernetes.io/job-name": "quickstart-lora-0",
                                res.LABEL_JOB: "quickstart-lora"},
                     "ownerReferences": [{"kind": "Job", "uid": "job-uid", "controller": True}]},
        "spec": {"nodeName": "gpu-0"}, "status": {"phase": pod_phase}})


def test_a_job_whose_pod_runs_at_once_gets_one_status_write_conditional_on_its_version(
        monkeypatch):
    kube = _Writes()
    controller, body, delays = _started(kube, monkeypatch)
    assert "Job" in [k for k, _, _ in kube.calls] and kube.writes == []
    assert delays == [pytest.approx(rec.START_WRITE_GRACE + 0.05, abs=0.2)]
    _watch(controller)
    controller._reconcile(KEY, body)
    ((status, version),) = kube.writes
    assert status["phase"] == "Running" and status["startTime"] and version == "10"
    controller._reconcile(KEY, body)  # the look its own write brings: nothing more
    assert len(kube.writes) == 1
    assert [reason for _, reason, _ in kube.events] == ["CreatedJob", "Running"]


def test_a_first_write_that_meets_a_newer_object_is_not_taken_as_written(monkeypatch):
    kube = _Writes(conflict=True)
    controller, body, delays = _started(kube, monkeypatch)
    _watch(controller)
    controller._reconcile(KEY, body)
    assert len(kube.writes) == 1 and "status" not in body
    assert delays[-1] == CONFLICT_LOOK_AGAIN
    kube.conflict = False
    body["metadata"]["resourceVersion"] = "13"
    controller._reconcile(KEY, body)
    assert kube.writes[-1][1] == "13" and body["status"]["phase"] == "Running"
    # later writes (the start is recorded) are not conditional: the trainer writes progress
    _watch(controller, "Succeeded")
    controller._reconcile(KEY, body)
    assert kube.writes[-1][1] is None and body["status"]["attempts"][0]["reason"] == \
        "Completing"


def test_a_spec_changed_before_the_start_deletes_the_job_once_and_starts_again(monkeypatch):
    kube = _Writes()
    controller, body, _ = _started(kube, monkeypatch)
    (job,) = controller.caches.jobs.children(KEY)
    assert job["metadata"]["annotations"][res.ANNOTATION_SPEC_GENERATION] == "1"
    body["metadata"]["generation"] = 2
    for _ in range(2):  # the second look, before the watch says the Job is gone, does nothing
        controller._reconcile(KEY, body)
    assert [d["metadata"]["name"] for d in kube.deletes] == ["quickstart-lora-0"]
    assert [reason for _, reason, _ in kube.events] == ["CreatedJob", "SpecChanged"]
    assert kube.writes == []
    controller.caches.jobs.remove(KEY, "quickstart-lora-0")  # the watch: DELETED
    controller._reconcile(KEY, body)
    (job,) = controller.caches.jobs.children(KEY)
    assert job["metadata"]["annotations"][res.ANNOTATION_SPEC_GENERATION] == "2"
    assert [k for k, _, _ in kube.calls].count("Job") == 2 and kube.writes == []
