"""What Flux's health checks (kstatus, fluxcd/cli-utils `pkg/kstatus/status`) make of our
statuses: Current (Ready=True for the observed generation), InProgress, or Failed
(Stalled=True) — a failed job or an adapter that cannot load ends a Kustomization's `wait` at
once instead of after its timeout. The rules below are kstatus' generic ones, in order."""

import pytest

from kubetune.api.validation import parse
from kubetune_operator.reconcile import loraadapter as la

from test_finetunejob_reconcile import _body, _job, _run
from test_loraadapter_reconcile import NOW, body

pytestmark = pytest.mark.unit


def kstatus(obj: dict) -> str:
    status = obj.get("status") or {}
    generation = obj["metadata"].get("generation")
    if "observedGeneration" in status and status["observedGeneration"] != generation:
        return "InProgress"
    conds = {c["type"]: c for c in status.get("conditions") or []}
    if (conds.get("Reconciling") or {}).get("status") == "True":
        return "InProgress"
    if (conds.get("Stalled") or {}).get("status") == "True":
        return "Failed"
    ready = conds.get("Ready")
    if ready is None:
        return "Current"
    return "Current" if ready["status"] == "True" else "InProgress"


def _with(obj: dict, status: dict) -> dict:
    return {**obj, "status": status}


def test_finetunejobs_read_as_kstatus_expects():
    body_ = _body()
    running = _run(body_, [_job(0)], [])
    assert kstatus(_with(body_, running.status)) == "InProgress"
    failed = _run(body_, [_job(0, [("Failed", "DeadlineExceeded", "too long")])], [])
    assert failed.status["phase"] == "Failed"
    assert kstatus(_with(body_, failed.status)) == "Failed"
    stalled = next(c for c in failed.status["conditions"] if c["type"] == "Stalled")
    assert stalled["reason"] == "DeadlineExceeded"  # the same words as Failed
    invalid = {**body_, "metadata": {**body_["metadata"], "name": "x" * 60}}
    assert kstatus(_with(invalid, _run(invalid).status)) == "Failed"
    # A newer generation not yet observed is in progress, whatever the conditions say.
    newer = {**body_, "metadata": {**body_["metadata"], "generation": 2}}
    assert kstatus(_with(newer, failed.status)) == "InProgress"


def test_loraadapters_read_as_kstatus_expects():
    obj = body()
    bad = la.Verification(False, "DigestMismatch", "adapter_model.safetensors sha256 differs")
    st = la.status(la.StatusInputs(obj, parse(obj), [], bad, None, None, None, None, None), NOW)
    assert kstatus(_with(obj, st)) == "Failed"
    waiting = la.Verification(False, "StorageError", "S3 did not answer")  # transient
    st = la.status(la.StatusInputs(obj, parse(obj), [], waiting, None, None, None, None, None),
                   NOW)
    assert kstatus(_with(obj, st)) == "InProgress"


def test_an_object_the_operator_has_not_seen_yet_is_in_progress():
    """Before the operator's first look an object has no status of its own: the CRD defaults
    it to `observedGeneration: 0`, so kstatus reads "not observed yet" (a status-less custom
    resource is Current to kstatus: Flux's `wait` passed before the job ran, found on the
    real Flux)."""
    from kubetune.api.crd import crd

    for kind in ("FineTuneJob", "LoRAAdapter"):
        schema = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        default = schema["properties"]["status"]["default"]
        assert default == {"observedGeneration": 0}
        assert kstatus({"metadata": {"generation": 1}, "status": default}) == "InProgress"
        assert kstatus({"metadata": {"generation": 1}}) == "Current"  # what it would be
