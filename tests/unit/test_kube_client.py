"""The API client wrapper against a stand-in apiserver (a local HTTP server that records each
request and answers from a script): paths and queries, content types, bodies, the answers read
as plain JSON, status codes mapped as the callers expect, lists paged with the kind a watch
event would carry, and every call under a deadline."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from kubetune_operator.kube import Kube, NotOwned, path

pytestmark = pytest.mark.unit


class _Apiserver:
    """Records (method, path, query, content type, authorization, body); answers each request
    with the next scripted (status, payload), or 200 {} when the script is empty."""

    def __init__(self):
        self.requests, self.answers = [], []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                url = urlsplit(self.path)
                outer.requests.append((self.command, url.path, dict(parse_qsl(url.query)),
                                       self.headers.get("Content-Type"),
                                       self.headers.get("Authorization"),
                                       json.loads(raw) if raw else None))
                status, payload = outer.answers.pop(0) if outer.answers else (200, {})
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _serve

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kube(self) -> Kube:
        configuration = client.Configuration()
        configuration.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        configuration.api_key = {"authorization": "secret-token"}
        configuration.api_key_prefix = {"authorization": "Bearer"}
        return Kube(client.ApiClient(configuration))


@pytest.fixture
def apiserver():
    server = _Apiserver()
    yield server
    server.server.shutdown()
    server.server.server_close()


def test_lists_are_paged_and_items_get_their_kind(apiserver):
    apiserver.answers = [
        (200, {"metadata": {"continue": "next"}, "items": [{"metadata": {"name": "a"}}]}),
        (200, {"metadata": {}, "items": [{"metadata": {"name": "b"}}]})]
    kube = apiserver.kube()
    items = kube.list("Job", "kubetune.io/loraadapter", "ns")
    assert [i["metadata"]["name"] for i in items] == ["a", "b"]
    assert all(i["kind"] == "Job" and i["apiVersion"] == "batch/v1" for i in items)
    assert [(m, p, q) for m, p, q, *_ in apiserver.requests] == [
        ("GET", "/apis/batch/v1/namespaces/ns/jobs",
         {"labelSelector": "kubetune.io/loraadapter", "limit": "500"}),
        ("GET", "/apis/batch/v1/namespaces/ns/jobs",
         {"labelSelector": "kubetune.io/loraadapter", "limit": "500", "continue": "next"})]
    assert all(r[4] == "Bearer secret-token" for r in apiserver.requests)
    assert kube.requests["list"] == 2
    kube.list("Pod", "app=x")  # every namespace
    assert apiserver.requests[-1][1] == "/api/v1/pods"
    assert kube.requests["list"] == 3


def test_creates_patches_and_status_go_where_and_how_the_apiserver_expects(apiserver):
    kube = apiserver.kube()
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": "j-0", "namespace": "ml"}, "spec": {"suspend": True}}
    apiserver.answers = [(201, job), (200, {"metadata": {"resourceVersion": "9"}}),
                         (200, {}), (409, {"reason": "Conflict"}), (200, {}), (200, {})]
    assert kube.create(job) is True
    assert kube.patch(job, {"spec": {"suspend": False}}) == "9"
    assert kube.patch_status("FineTuneJob", "ml", "x", {"phase": "Running"}, "41") is True
    assert kube.patch_status("FineTuneJob", "ml", "x", {"phase": "Running"}, "41") is False
    assert kube.runtime("ClusterFineTuneRuntime", "ml", "gpu") == {}
    assert kube.runtime("FineTuneRuntime", "ml", "gpu") == {}
    seen = [(m, p, t, b) for m, p, _, t, _, b in apiserver.requests]
    assert seen == [
        ("POST", "/apis/batch/v1/namespaces/ml/jobs", "application/json", job),
        ("PATCH", "/apis/batch/v1/namespaces/ml/jobs/j-0",
         "application/strategic-merge-patch+json", {"spec": {"suspend": False}}),
        ("PATCH", "/apis/kubetune.io/v1alpha1/namespaces/ml/finetunejobs/x/status",
         "application/merge-patch+json",
         {"status": {"phase": "Running"}, "metadata": {"resourceVersion": "41"}}),
        ("PATCH", "/apis/kubetune.io/v1alpha1/namespaces/ml/finetunejobs/x/status",
         "application/merge-patch+json",
         {"status": {"phase": "Running"}, "metadata": {"resourceVersion": "41"}}),
        ("GET", "/apis/kubetune.io/v1alpha1/clusterfinetuneruntimes/gpu", None, None),
        ("GET", "/apis/kubetune.io/v1alpha1/namespaces/ml/finetuneruntimes/gpu", None, None)]


def test_a_taken_name_is_ours_or_refused_and_errors_keep_their_status(apiserver):
    kube = apiserver.kube()
    sa = {"apiVersion": "v1", "kind": "ServiceAccount",
          "metadata": {"name": "x-trainer", "namespace": "ml",
                       "ownerReferences": [{"uid": "u-1", "controller": True}]}}
    theirs = {"metadata": {"ownerReferences": [{"uid": "u-2", "controller": True}]}}
    apiserver.answers = [(409, {}), (200, sa), (409, {}), (200, theirs), (500, {"m": "x"}),
                         (404, {}), (404, {})]
    assert kube.create(sa) is False  # ours already
    with pytest.raises(NotOwned, match="not controlled by this object"):
        kube.create(sa)
    with pytest.raises(ApiException) as err:
        kube.create(sa)
    assert err.value.status == 500 and '"m": "x"' in err.value.body
    assert kube.get_custom("LoRAAdapter", "ml", "gone") is None
    assert kube.patch({"kind": "Deployment", "metadata": {"name": "d", "namespace": "ml"}},
                      {"spec": {}}) is None
    assert [p for _, p, *_ in apiserver.requests][:2] == [
        "/api/v1/namespaces/ml/serviceaccounts", "/api/v1/namespaces/ml/serviceaccounts/x-trainer"]
    assert kube.requests["create"] == 3 and kube.requests["get"] == 3


def test_names_never_leave_their_path_segment():
    template, params = path("Job", "ml", "../../secrets/x")
    assert template == "/apis/batch/v1/namespaces/{namespace}/jobs/{name}"
    assert params == {"namespace": "ml", "name": "../../secrets/x"}
    with pytest.raises(ValueError, match="namespaced"):
        path("Job", None, "j")


def test_names_are_quoted_on_the_wire(apiserver):
    apiserver.answers = [(404, {})]
    assert apiserver.kube().get_custom("FineTuneJob", "ml", "../../x?y=1") is None
    assert apiserver.requests[0][1] == \
        "/apis/kubetune.io/v1alpha1/namespaces/ml/finetunejobs/..%2F..%2Fx%3Fy%3D1"
    assert apiserver.requests[0][2] == {}


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


def test_a_job_is_deleted_in_the_background_only_if_it_is_still_the_same_one(apiserver):
    """A spec changed before the start: the old Job goes (its pods after it); its uid is the
    precondition, so a newer Job of the same name is never hit; gone or replaced is fine."""
    kube = apiserver.kube()
    apiserver.answers = [(200, {}), (404, {}), (409, {}), (500, {})]
    job = {"kind": "Job", "metadata": {"name": "j-0", "namespace": "ml", "uid": "u-0"}}
    for _ in range(3):
        kube.delete(job)
    assert apiserver.requests[0][:2] == ("DELETE", "/apis/batch/v1/namespaces/ml/jobs/j-0")
    assert apiserver.requests[0][5] == {"propagationPolicy": "Background",
                                        "preconditions": {"uid": "u-0"}}
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


def test_kueue_not_installed_is_believed_briefly_then_asked_again(apiserver, monkeypatch):
    """A 404 from Kueue's Workload API means no Kueue (None, not "no Workload yet"); it is
    believed for NO_KUEUE_RECHECK seconds (no request per look), then asked again: a Kueue
    installed while the operator runs is seen within seconds, not minutes."""
    from kubetune_operator import kube as kube_mod

    clock = [1000.0]
    monkeypatch.setattr(kube_mod.time, "monotonic", lambda: clock[0])
    kube = apiserver.kube()
    wl = {"metadata": {"name": "job-a-0-x", "labels": {"kueue.x-k8s.io/job-uid": "u1"}}}
    apiserver.answers = [(404, {"reason": "NotFound"}), (200, {"items": [wl]})]
    assert kube.workloads("ml", "kueue.x-k8s.io/job-uid in (u1)") is None
    clock[0] += kube_mod.NO_KUEUE_RECHECK - 0.5
    assert kube.workloads("ml", "kueue.x-k8s.io/job-uid in (u1)") is None
    assert len(apiserver.requests) == 1  # believed: no second request
    clock[0] += 1.0
    [got] = kube.workloads("ml", "kueue.x-k8s.io/job-uid in (u1)")
    assert got["kind"] == "Workload" and got["apiVersion"] == "kueue.x-k8s.io/v1beta2"
    assert [(m, p, q) for m, p, q, *_ in apiserver.requests] == [
        ("GET", "/apis/kueue.x-k8s.io/v1beta2/namespaces/ml/workloads",
         {"labelSelector": "kueue.x-k8s.io/job-uid in (u1)", "limit": "50"})] * 2
    assert kube_mod.NO_KUEUE_RECHECK <= 30  # never minutes
    apiserver.answers = [(500, {"reason": "InternalError"})]
    with pytest.raises(ApiException):  # only a 404 says "not installed"
        kube.workloads("ml", "kueue.x-k8s.io/job-uid in (u1)")
