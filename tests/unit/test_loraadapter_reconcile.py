"""The pure LoRAAdapter reconcile: compatibility, mode resolution, alias hand-over, replica
actions and the status rebuilt from observed replicas."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from kubetune.api.validation import parse
from kubetune_operator.reconcile import merged
from kubetune_operator.reconcile import loraadapter as rec

pytestmark = pytest.mark.unit
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


def body(name="a", created="2026-11-28T10:00:00Z", generation=1, **spec) -> dict:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "LoRAAdapter",
            "metadata": {"name": name, "namespace": "ns", "generation": generation,
                         "creationTimestamp": created, "uid": "u-" + name},
            "spec": {"baseModel": {"uri": "builtin://tiny-llama", "revision": "v1"},
                     "source": {"uri": "s3://bkt/x"}, "servingName": name,
                     "target": {"deployment": "srv"}, **spec}}


def verified(method="LoRA", rank=8, base="builtin://tiny-llama", revision="v1"):
    return rec.Verification(True, "Verified", "", "s3://bkt/x", "ab" * 32, method, rank, base,
                            revision)


def with_conditions(obj: dict, **conds) -> dict:
    obj["status"] = {"conditions": [
        {"type": k, "status": v, "reason": "R", "observedGeneration": obj["metadata"]["generation"]}
        for k, v in conds.items()]}
    return obj


@pytest.mark.parametrize("spec,v,ok,reason", [
    ({}, verified(), True, "Compatible"),
    ({}, verified(base="builtin://other"), False, "BaseModelMismatch"),
    ({}, verified(revision="v2"), False, "BaseModelMismatch"),
    ({"compatibility": {"maxRank": 4}}, verified(rank=8), False, "RankTooHigh"),
    ({"target": {"deployment": "srv", "runtime": "vllm"}, "mode": "HotSwap"},
     verified("PrefixTuning", None), False, "MethodNotServable"),
    ({"target": {"deployment": "srv", "runtime": "vllm"}}, verified("Adapter", None), False,
     "MethodNotServable"),
    ({"target": {"deployment": "srv", "runtime": "vllm"}}, verified("IA3", None), True,
     "Compatible"),  # Auto resolves to Merged
    ({"mode": "Merged"}, verified("PrefixTuning", None), False, "MethodNotMergeable"),
    ({"target": {"deployment": "srv", "runtime": "kubetune"}}, verified("Adapter", None), True,
     "Compatible"),
])
def test_compatibility(spec, v, ok, reason):
    adapter = parse(body(**spec))
    got = rec.compatibility(adapter, v)
    assert (got[0], got[1]) == (ok, reason), got


def test_auto_mode_merges_what_the_runtime_cannot_hot_swap():
    vllm = parse(body(target={"deployment": "srv", "runtime": "vllm"}))
    assert rec.resolve_mode(vllm, "IA3") == "Merged"
    assert rec.resolve_mode(vllm, "LoRA") == "HotSwap"
    assert rec.resolve_mode(parse(body()), "IA3") == "HotSwap"


def test_newest_promoted_version_wins_and_the_old_one_holds_until_it_is_ready():
    v1 = with_conditions(body("v1", "2026-11-28T10:00:00Z", alias="s"), Promoted="True",
                         Ready="True", Loaded="True")
    v2 = with_conditions(body("v2", "2026-11-28T11:00:00Z", alias="s"), Promoted="True",
                         Ready="False", Loaded="False")
    assert rec.decide(v2, True, [v1]).want == "load"
    hold = rec.decide(v1, True, [v2])
    assert hold.want == "hold" and hold.successor == "v2"
    v2 = with_conditions(v2, Promoted="True", Ready="True", Loaded="True")
    gone = rec.decide(v1, True, [v2])
    assert (gone.want, gone.reason) == ("unload", "Superseded")
    # A stale condition (older generation) does not count.
    v2["metadata"]["generation"] = 2
    assert rec.decide(v1, True, [v2]).want == "load"
    # Revert: the newer version is being deleted; it hands back to v1 and waits for it.
    v2 = with_conditions(body("v2", "2026-11-28T11:00:00Z", alias="s"), Promoted="True",
                         Ready="True", Loaded="True")
    v2["metadata"]["deletionTimestamp"] = "2026-11-28T12:00:00Z"
    assert rec.decide(v1, True, [v2]).want == "load"
    v1_loading = with_conditions(body("v1", alias="s"), Promoted="True", Ready="False")
    assert rec.decide(v2, True, [v1_loading]).want == "hold"
    assert rec.decide(v2, True, [with_conditions(body("v1", alias="s"), Promoted="True",
                                                 Ready="True", Loaded="True")]).want == "unload"
    assert rec.decide(v2, True, []).want == "unload"


def test_same_group_needs_alias_and_target():
    a, b = body("a", alias="s"), body("b", alias="s")
    assert rec.same_group(a, b)
    assert not rec.same_group(a, body("c", alias="t"))
    assert not rec.same_group(a, body("d", alias="s", target={"deployment": "other"}))
    assert not rec.same_group(body("e"), body("f"))


def test_actions_load_missing_replace_stale_unload_extra():
    reps = [rec.Replica("p0", "i", {}), rec.Replica("p1", "i", {"a": "s3://bkt/x"}),
            rec.Replica("p2", "i", {"a": "s3://bkt/old"}), rec.Replica("p3", "i", None, error="x")]
    load, unload, replace = rec.actions(reps, "a", "s3://bkt/x", "load")
    assert [r.pod for r in load] == ["p0"] and [r.pod for r in replace] == ["p2"] and not unload
    load, unload, replace = rec.actions(reps, "a", "s3://bkt/x", "unload")
    assert [r.pod for r in unload] == ["p1", "p2"] and not load and not replace
    assert rec.actions(reps, "a", "s3://bkt/x", "hold") == ([], [], [])


def test_status_counts_per_replica_truth_and_bounds_failures():
    obj = body()
    adapter = parse(obj)
    reps = [rec.Replica(f"p{i}", "i", {"a": "s3://bkt/x"} if i < 2 else {}) for i in range(3)]
    failures = [rec.Failure("p2", "LoadRejected", "HTTP 400: rank too high")]
    inp = rec.StatusInputs(obj, adapter, [], verified(), (True, "Compatible", ""), (True, ""),
                           "HotSwap", None, rec.Decision("load", "Serving", ""), reps, failures,
                           "s3://bkt/x", desired=3)
    st = rec.status(inp, NOW)
    assert st["replicas"] == {"desired": 3, "loaded": 2, "failed": 1}
    assert st["loadedReplicas"] == "2/3" and st["observedGeneration"] == 1
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Loaded"]["reason"] == "PartiallyLoaded" and conds["Ready"]["status"] == "False"
    assert conds["Degraded"]["status"] == "True" and "p2" in conds["Degraded"]["message"]
    assert st["failures"][0]["pod"] == "p2"
    # Many failures stay bounded; a persisting one keeps its first time.
    obj["status"] = st
    many = [rec.Failure(f"q{i}", "Unreachable", "x") for i in range(15)]
    inp.failures = many + failures
    st2 = rec.status(inp, NOW.replace(hour=13))
    assert len(st2["failures"]) == rec.MAX_FAILURES
    inp.failures = failures
    st3 = rec.status(inp, NOW.replace(hour=14))
    assert st3["failures"][0]["time"] == "2026-11-28T12:00:00Z"


def test_status_of_a_corrupt_artifact_and_of_a_foreign_condition():
    obj = body()
    obj["status"] = {"conditions": [{"type": "EvalPassed", "status": "True", "reason": "X",
                                     "message": "", "observedGeneration": 1}]}
    bad = rec.Verification(False, "DigestMismatch", "adapter_model.safetensors sha256 differs")
    st = rec.status(rec.StatusInputs(obj, parse(obj), [], bad, None, None, None, None, None),
                    NOW)
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["ArtifactVerified"]["reason"] == "DigestMismatch"
    assert conds["Degraded"]["status"] == "True" and conds["Ready"]["status"] == "False"
    assert conds["EvalPassed"]["status"] == "True"  # set by someone else, kept
    assert "replicas" not in st


def test_gates_read_the_source_job_and_this_adapter():
    adapter = parse(body(promotion={"requires": [{"conditionType": "EvalPassed"},
                                                 {"conditionType": "Approved",
                                                  "object": "LoRAAdapter"}]}))
    job = {"metadata": {"name": "j"}, "status": {"conditions": [
        {"type": "EvalPassed", "status": "True"}]}}
    ok, message = rec.gates(adapter, [], job)
    assert not ok and "Approved" in message and "EvalPassed" not in message
    assert rec.gates(adapter, [{"type": "Approved", "status": "True"}], job) == (True, "")
    ok, message = rec.gates(adapter, [{"type": "Approved", "status": "True"}], None)
    assert not ok and "no source FineTuneJob" in message


def test_merged_model_argument_is_found_and_replaced_where_it_was():
    ctr = {"name": "s", "args": ["--model", "builtin://x", "--port", "8000"]}
    assert merged.model_of(ctr) == "builtin://x"
    assert merged.with_model(ctr, "s3://m")["args"] == ["--model", "s3://m", "--port", "8000"]
    assert ctr["args"][1] == "builtin://x"  # not mutated
    eq = {"name": "s", "command": ["vllm", "serve", "--model=a"]}
    assert merged.with_model(eq, "b")["command"][-1] == "--model=b"
    env = {"name": "s", "env": [{"name": "KUBETUNE_MODEL", "value": "a"}]}
    assert merged.model_of(env) == "a"
    assert merged.model_of(merged.with_model(env, "b")) == "b"


def test_the_merge_job_is_restricted_bounded_and_pins_the_verified_digest():
    from kubetune_operator.settings import OperatorSettings

    obj = body(mode="Merged")
    from kubetune_operator.resources import finetunejob as training
    from kubetune_operator.resources.loraadapter import merge_job

    job = merge_job(obj, parse(obj), "d" * 64, "s3://bkt/x", "s3://bkt/x-merged",
                    OperatorSettings(merge_deadline_seconds=900))
    spec = job["spec"]
    assert spec["activeDeadlineSeconds"] == 900 and spec["backoffLimit"] == 1
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    args = container["args"]
    assert args[args.index("--adapter-sha256") + 1] == "d" * 64
    assert job["metadata"]["ownerReferences"][0]["uid"] == "u-a"
    # Built from the training Job's pieces: the same pod and container hardening, no API token.
    ft = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
          "metadata": {"name": "j", "namespace": "ns", "uid": "u-j"},
          "spec": {"baseModel": {"uri": "builtin://tiny-llama"},
                   "dataset": {"train": {"uri": "builtin://reviews"}},
                   "method": {"type": "LoRA"}, "output": {"uri": "s3://bkt/j"}}}
    train_pod = training.training_job(parse(ft), ft, 0, OperatorSettings(),
                                      False)["spec"]["template"]["spec"]
    assert pod["securityContext"] == train_pod["securityContext"]
    assert sc == train_pod["containers"][0]["securityContext"]
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert pod["automountServiceAccountToken"] is False
    assert train_pod["automountServiceAccountToken"] is True  # its progress needs the API
    assert {"name": "scratch", "mountPath": "/tmp"} in container["volumeMounts"]


def test_a_replica_that_lists_the_adapter_but_answers_like_the_base_is_not_loaded():
    """vLLM issue 55193: accepted, listed, and still serving the base model."""
    obj = body()
    reps = [rec.Replica("p0", "i", {"a": "s3://bkt/x"}, behaviour="ok"),
            rec.Replica("p1", "i", {"a": "s3://bkt/x"}, behaviour="mismatch",
                        behaviour_message="that is the base model"),
            rec.Replica("p2", "i", {"a": "s3://bkt/x"}, behaviour="unknown")]
    failures = rec.failures_for(reps, "a", "s3://bkt/x", "load", {}, "builtin://tiny-llama",
                                "kubetune")
    assert [(f.pod, f.reason) for f in failures] == [("p1", "BehaviourMismatch")]
    inp = rec.StatusInputs(obj, parse(obj), [], verified(), (True, "Compatible", ""),
                           (True, ""), "HotSwap", None, rec.Decision("load", "Serving", ""),
                           reps, failures, "s3://bkt/x", desired=3)
    st = rec.status(inp, NOW)
    assert st["replicas"] == {"desired": 3, "loaded": 1, "failed": 1}
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Ready"]["status"] == "False" and conds["Degraded"]["status"] == "True"
    assert "BehaviourMismatch" in conds["Loaded"]["message"]
    for r in reps:
        r.behaviour = "ok"
    st = rec.status(rec.StatusInputs(obj, parse(obj), [], verified(), (True, "Compatible", ""),
                                     (True, ""), "HotSwap", None,
                                     rec.Decision("load", "Serving", ""), reps, [],
                                     "s3://bkt/x", desired=3), NOW)
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Ready"]["status"] == "True" and "probe" in conds["Loaded"]["message"]


@pytest.mark.parametrize("v, deleting, want", [
    (rec.Verification(False, "StorageError", "s3 down"), False, "hold"),  # keep serving
    (rec.Verification(False, "SourceNotReady", "not yet"), False, "hold"),
    (rec.Verification(False, "DigestMismatch", "tampered"), False, "unload"),  # terminal
    (rec.Verification(False, "StorageError", "s3 down"), True, "unload"),  # deletion wins
])
def test_only_a_transient_failure_keeps_what_is_served(v, deleting, want):
    d = rec.keep_through_transient(rec.Decision("unload", "NotPromoted", ""), v, deleting)
    assert d.want == want


def _outcome_inputs(models: list[dict | None], want: str = "load"):
    obj = body()
    reps = [rec.Replica(f"p{i}", "i", m) for i, m in enumerate(models)]
    return rec.StatusInputs(obj, parse(obj), [], verified(), (True, "Compatible", ""),
                            (True, ""), "HotSwap", None, rec.Decision(want, "Serving", "why"),
                            reps, [], "s3://bkt/x", desired=len(models))


@pytest.mark.parametrize("models, acted, errors, deleting, left, release, requeue, events", [
    # steady state: nothing done, all loaded → the slow resync
    ([{"a": "s3://bkt/x"}] * 2, rec.Acted(), {}, False, None, False, 30.0, []),
    # just loaded on one: look again soon, one Event
    ([{"a": "s3://bkt/x"}] * 2, rec.Acted(["p1"]), {}, False, None, False, 2.0,
     ["LoadedOnReplica"]),
    # a failed load: a Warning, soon again
    ([{"a": "s3://bkt/x"}, {}], rec.Acted(["p1"]),
     {"p1": rec.Failure("p1", "LoadRejected", "rank")}, False, None, False, 2.0,
     ["LoadFailed"]),
    # still on the old target
    ([{"a": "s3://bkt/x"}] * 2, rec.Acted(), {}, False, "old", False, 2.0, []),
    # deleting: released only once no replica lists it
    ([{}, {}], rec.Acted([], ["p0"]), {}, True, None, True, 1.0, ["UnloadedFromReplica"]),
    ([{"a": "s3://bkt/x"}, {}], rec.Acted(), {}, True, None, False, 1.0, []),
])
def test_hot_swap_outcome_table(models, acted, errors, deleting, left, release, requeue,
                                events):
    inp = _outcome_inputs(models, "unload" if deleting else "load")
    out = rec.hot_swap_outcome(inp, acted, errors, deleting, left, 30.0, NOW)
    assert out.release is release and out.requeue_after == requeue
    assert [e[1] for e in out.events] == events
    assert (out.status is None) is deleting
    if left:
        assert out.status["servedTarget"] == left
