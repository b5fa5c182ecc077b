"""The typed contracts in `kubetune/`: the trainer's exit codes and termination summary, and
the registry of condition reasons the operator decides by."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from kubetune import reasons
from kubetune.contract import MAX_MESSAGE_BYTES, ExitCode, TerminationSummary

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_exit_codes_are_the_ones_the_job_policy_and_kubelet_use():
    assert [int(c) for c in ExitCode] == [0, 1, 2, 143]  # 143 = 128 + SIGTERM


def test_a_summary_too_large_for_the_termination_message_still_parses():
    metrics = {f"m{i}": "x" * 300 for i in range(30)}
    metrics["steps"] = 12
    summary = TerminationSummary(status="Succeeded", metrics=metrics,
                                 artifact={"uri": "s3://b/a", "manifestSha256": "0" * 64})
    text = summary.render()
    assert len(text.encode()) <= MAX_MESSAGE_BYTES
    back = TerminationSummary.parse(text)
    assert back.status == "Succeeded" and back.artifact["uri"] == "s3://b/a"
    assert back.metrics["steps"] == 12  # small metrics survive, large ones go first
    huge = TerminationSummary(status="Failed", reason="Error", message="é" * 9000).render()
    assert len(huge.encode()) <= MAX_MESSAGE_BYTES and \
        TerminationSummary.parse(huge).reason == "Error"


@pytest.mark.parametrize("text, status", [
    ("not json", "Unknown"), ("[1, 2]", "Unknown"), ('{"status": 7}', "Unknown"),
    ('{"status": "Preempted", "checkpointStep": "3"}', "Preempted"),
])
def test_any_text_the_container_writes_is_a_bounded_summary(text, status):
    parsed = TerminationSummary.parse(text)
    assert parsed.status == status
    assert parsed.checkpointStep is None  # a string is not a step
    assert TerminationSummary.parse("") is None


def test_hostile_summary_fields_are_dropped_or_bounded():
    parsed = TerminationSummary.parse(json.dumps({
        "status": "Failed", "reason": {"x": 1}, "message": "m" * 10_000, "metrics": [1],
        "artifact": "s3://evil", "extra": "ignored"}))
    assert parsed.reason is None and parsed.metrics is None and parsed.artifact is None
    assert len(parsed.message) == 2000 and "extra" not in parsed.as_dict()


def test_reason_kinds_drive_degraded_and_warnings():
    assert not reasons.degrades("StorageError") and reasons.warns("StorageError")
    assert reasons.degrades("DigestMismatch") and reasons.degrades("BehaviourMismatch")
    assert not reasons.warns("PromotionPending") and not reasons.degrades("Pending")
    assert reasons.degrades("SomethingNobodyRegistered")  # unknown: never silently ignored
    for reason in reasons.REASONS.values():
        assert reason.doc and reason.kind in ("ok", "progress", "transient", "terminal")


def test_every_reason_the_adapter_side_writes_is_registered():
    """A CamelCase literal in the LoRAAdapter modules is a registered reason, a condition type,
    or one of the Kubernetes / spec words listed here: new inline reasons fail this test."""
    other = {"LoRA", "QLoRA", "IA3", "PrefixTuning", "Adapter", "Auto", "HotSwap", "Merged",
             "FineTuneJob", "LoRAAdapter", "Job", "True", "False", "Normal", "Warning",
             "Running", "Failed", "Never", "Exists", "NoSchedule", "FallbackToLogsOnError",
             "Progressing", "ProgressDeadlineExceeded", "PodScheduled", "Unschedulable",
             "RollingUpdate", "CrashLoopBackOff", "NoSuchKey", "Accept", "Authorization",
             "Deployment", "Pod", "Complete", "Ready"}
    known = set(reasons.REASONS) | set(reasons.LORAADAPTER_CONDITIONS) | other
    files = ["reconcile/loraadapter.py", "reconcile/merged.py", "adapters.py", "merged.py",
             "engine.py", "verification.py", "cache.py"]
    unknown = []
    for name in files:
        path = ROOT / "operator" / "kubetune_operator" / name
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    re.fullmatch(r"[A-Z][a-z]+(?:[A-Z0-9][a-z0-9]*)*", node.value) and \
                    node.value not in known:
                unknown.append(f"{name}:{node.lineno}: {node.value}")
    assert not unknown, unknown


def test_a_pinned_load_path_round_trips_and_a_look_alike_pin_is_not_one():
    from kubetune.artifacts import pinned, split_pin

    digest = "0123456789abcdef" * 4
    assert split_pin(pinned("s3://b/a", digest)) == ("s3://b/a", digest)
    assert pinned("s3://b/a", None) == "s3://b/a" and split_pin("s3://b/a") == ("s3://b/a", None)
    # An S3 key may hold "@sha256:" itself: only 64 lowercase hex digits after the last one pin.
    for path in ("s3://b/a@sha256:xyz", "s3://b/a@sha256:" + "A" * 64,
                 "s3://b/a@sha256:" + "0" * 63, "s3://b/a@sha256:" + digest + "/x"):
        assert split_pin(path) == (path, None)
    assert split_pin(f"s3://b/x@sha256:y/a@sha256:{digest}") == ("s3://b/x@sha256:y/a", digest)


def test_storage_clients_are_shared_per_configuration_and_bounded():
    """A boto3 client costs ~190 ms of CPU to create: long-running processes share one per
    endpoint, region, keys and limits; a rotated key is a new client; the set is bounded."""
    from kubetune import storage

    a = storage.shared("http://127.0.0.1:1", "r", 2, "k", "s", 30.0)
    assert storage.shared("http://127.0.0.1:1", "r", 2, "k", "s", 30.0) is a
    assert storage.shared("http://127.0.0.1:1", "r", 2, "k2", "s", 30.0) is not a
    for i in range(storage.SHARED_CLIENTS + 5):
        storage.shared(f"http://127.0.0.1:{i + 2}")
    assert len(storage._shared) == storage.SHARED_CLIENTS
    assert storage.shared("http://127.0.0.1:1", "r", 2, "k", "s", 30.0) is not a  # dropped
