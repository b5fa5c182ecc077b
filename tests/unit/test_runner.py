"""The instrumented reconcile: results counted, failures retried, a namespace being deleted is
not an error."""

import pytest
from kubernetes.client.exceptions import ApiException
from structlog.testing import capture_logs

from kubetune_operator.metrics import RECONCILES
from kubetune_operator.runner import Reported, namespace_terminating, run_reconcile

pytestmark = pytest.mark.unit

# The body the apiserver sends when a create hits a terminating namespace (from a real run).
TERMINATING = ('{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":'
               '"configmaps \\"full-config\\" is forbidden: unable to create new content in '
               'namespace t-a because it is being terminated","reason":"Forbidden","details":'
               '{"name":"full-config","kind":"configmaps","causes":[{"reason":'
               '"NamespaceTerminating","message":"namespace t-a is being terminated","field":'
               '"metadata.namespace"}]},"code":403}')


def _api_error(status: int, body: str) -> ApiException:
    exc = ApiException(status=status, reason="Forbidden")
    exc.body = body
    return exc


def _count(result: str) -> float:
    return RECONCILES.labels(kind="Test", result=result)._value.get()


def test_results_retries_and_terminating_namespaces():
    retried = []
    before = {r: _count(r) for r in ("success", "error", "skipped")}

    run_reconcile("Test", ("ns", "a"), {"x": 1}, lambda k, b: None, retried.append)
    run_reconcile("Test", ("ns", "a"), None, lambda k, b: 1 / 0, retried.append)
    assert retried == [] and _count("success") == before["success"] + 1
    assert _count("skipped") == before["skipped"] + 1

    def boom(key, body):
        raise RuntimeError("apiserver down")
    run_reconcile("Test", ("ns", "b"), {"x": 1}, boom, retried.append)
    assert retried == [("ns", "b")] and _count("error") == before["error"] + 1

    def terminating(key, body):
        raise _api_error(403, TERMINATING)
    run_reconcile("Test", ("t-a", "c"), {"x": 1}, terminating, retried.append)
    assert retried == [("ns", "b")]  # not retried, not an error
    assert _count("skipped") == before["skipped"] + 2

    def said(key, body):
        raise Reported("creating Job x-0 was refused by the apiserver (403): quota")
    with capture_logs() as logs:
        run_reconcile("Test", ("ns", "d"), {"x": 1}, said, retried.append)
        run_reconcile("Test", ("ns", "b"), {"x": 1}, boom, retried.append)
    assert retried == [("ns", "b"), ("ns", "d"), ("ns", "b")]  # retried like any failure
    assert _count("error") == before["error"] + 3
    reported, failed = logs
    assert reported["log_level"] == "warning" and "exc_info" not in reported
    assert reported["error"].endswith("(403): quota") and reported["name"] == "d"
    assert failed["log_level"] == "error" and failed["exc_info"] is True  # the traceback

    assert namespace_terminating(_api_error(403, TERMINATING))
    assert not namespace_terminating(_api_error(403, '{"reason":"Forbidden"}'))  # RBAC: an error
    assert not namespace_terminating(RuntimeError("NamespaceTerminating"))
