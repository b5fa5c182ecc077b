"""The API client wrapper reads responses as plain JSON, pages lists and gives listed items the
kind a watch event would carry (no apiserver: the client methods are stubbed)."""

from __future__ import annotations

import json

import pytest

from kubetune_operator.kube import REQUEST_TIMEOUT, Kube

pytestmark = pytest.mark.unit


class _Response:
    def __init__(self, payload):
        self.data = json.dumps(payload).encode()
        self.released = False

    def release_conn(self):
        self.released = True


def test_lists_are_paged_and_items_get_their_kind():
    import threading
    from collections import Counter

    kube = Kube.__new__(Kube)  # no ApiClient: the client methods are stubbed below
    kube.requests, kube._lock = Counter(), threading.Lock()
    calls, responses = [], []

    def list_jobs(namespace, label_selector, limit, _preload_content, _request_timeout,
                  _continue=None):
        assert _request_timeout == REQUEST_TIMEOUT  # every call has a deadline
        assert _preload_content is False and limit == 500
        calls.append(_continue)
        page = {"metadata": {"continue": "next"}, "items": [{"metadata": {"name": "a"}}]} \
            if _continue is None else {"metadata": {}, "items": [{"metadata": {"name": "b"}}]}
        responses.append(_Response(page))
        return responses[-1]
    from types import SimpleNamespace

    kube.batch = SimpleNamespace(list_namespaced_job=list_jobs,
                                 list_job_for_all_namespaces=None)
    kube.core = SimpleNamespace(list_namespaced_pod=None, list_pod_for_all_namespaces=None)
    kube.apps = SimpleNamespace(list_namespaced_deployment=None,
                                list_deployment_for_all_namespaces=None)
    items = kube.list("Job", "kubetune.io/loraadapter", "ns")
    assert [i["metadata"]["name"] for i in items] == ["a", "b"] and calls == [None, "next"]
    assert all(i["kind"] == "Job" and i["apiVersion"] == "batch/v1" for i in items)
    assert all(r.released for r in responses)  # connections go back to the pool
    assert kube.requests["list"] == 2


def test_the_shared_client_holds_a_connection_for_every_worker(tmp_path, monkeypatch):
    """More workers than the client's default pool (five per CPU) would each open, handshake
    and throw away a connection per request; the pool is sized from the worker settings."""
    from kubetune_operator.main import api_client
    from kubetune_operator.settings import OperatorSettings

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    settings = OperatorSettings(finetunejob_workers=40, adapter_workers=30)
    api = api_client(settings)
    assert api.configuration.host == "https://127.0.0.1:6443"
    assert api.rest_client.pool_manager.connection_pool_kw["maxsize"] >= 70


def test_a_job_is_deleted_in_the_background_only_if_it_is_still_the_same_one():
    """A spec changed before the start: the old Job goes (its pods after it); its uid is the
    precondition, so a newer Job of the same name is never hit; gone or replaced is fine."""
    import threading
    from collections import Counter
    from types import SimpleNamespace

    from kubernetes.client.rest import ApiException

    kube = Kube.__new__(Kube)
    kube.requests, kube._lock = Counter(), threading.Lock()
    calls, answers = [], [None, ApiException(status=404), ApiException(status=409),
                          ApiException(status=500)]

    def delete_job(name, namespace, body, _preload_content, _request_timeout):
        calls.append((name, namespace, body))
        answer = answers.pop(0)
        if answer is not None:
            raise answer
        return _Response({})

    kube.batch = SimpleNamespace(delete_namespaced_job=delete_job)
    job = {"kind": "Job", "metadata": {"name": "j-0", "namespace": "ml", "uid": "u-0"}}
    for _ in range(3):
        kube.delete(job)
    assert calls[0] == ("j-0", "ml", {"propagationPolicy": "Background",
                                      "preconditions": {"uid": "u-0"}})
    with pytest.raises(ApiException):
        kube.delete(job)
    assert kube.requests["delete"] == 4


def test_a_call_to_an_apiserver_that_never_answers_ends_at_its_deadline(monkeypatch):
    """A real client against a socket that accepts and never answers: the call fails within
    its deadline instead of blocking its caller (a start-up LIST) for good."""
    import socket
    import time

    from kubernetes import client

    from kubetune_operator import kube as kube_mod

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    monkeypatch.setattr(kube_mod, "REQUEST_TIMEOUT", (1.0, 0.5), raising=False)
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{silent.getsockname()[1]}"
    configuration.retries = 0
    kube = Kube(client.ApiClient(configuration))
    started = time.monotonic()
    try:
        with pytest.raises(Exception, match="(?i)timed? ?out"):
            kube.list("Pod", "", "default")
    finally:
        silent.close()
    assert time.monotonic() - started < 5
