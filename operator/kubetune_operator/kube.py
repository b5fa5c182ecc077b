"""The one module that talks to the Kubernetes API: creates that tolerate 409, patches and
deletes that tolerate 404, status patches, Events. It counts its requests (for benchmarks and
metrics)."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import Counter
from datetime import datetime, timezone

from kubernetes import client
from kubernetes.client.rest import ApiException

from .resources.finetunejob import KUEUE_API

GROUP, VERSION = "kubetune.io", "v1alpha1"
PLURALS = {"FineTuneJob": "finetunejobs", "LoRAAdapter": "loraadapters"}
KUEUE_GROUP, KUEUE_VERSION = KUEUE_API.split("/")
# Where each kind lives: (API prefix, plural, namespaced).
RESOURCES = {
    "Pod": ("/api/v1", "pods", True),
    "Secret": ("/api/v1", "secrets", True),
    "Service": ("/api/v1", "services", True),
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "Event": ("/api/v1", "events", True),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    "Job": ("/apis/batch/v1", "jobs", True),
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "FineTuneJob": (f"/apis/{GROUP}/{VERSION}", "finetunejobs", True),
    "LoRAAdapter": (f"/apis/{GROUP}/{VERSION}", "loraadapters", True),
    "FineTuneRuntime": (f"/apis/{GROUP}/{VERSION}", "finetuneruntimes", True),
    "ClusterFineTuneRuntime": (f"/apis/{GROUP}/{VERSION}", "clusterfinetuneruntimes", False),
    "Workload": (f"/apis/{KUEUE_GROUP}/{KUEUE_VERSION}", "workloads", True),
    "ValidatingAdmissionPolicy": ("/apis/admissionregistration.k8s.io/v1",
                                  "validatingadmissionpolicies", False),
    "ValidatingAdmissionPolicyBinding": ("/apis/admissionregistration.k8s.io/v1",
                                         "validatingadmissionpolicybindings", False),
}
CREATABLE = {"ServiceAccount", "Service", "Role", "RoleBinding", "Job", *PLURALS}
MERGE_PATCH = "application/merge-patch+json"  # custom resources (and any status)
STRATEGIC_PATCH = "application/strategic-merge-patch+json"  # built-in kinds
# Seconds a 404 from Kueue's Workload API is believed: no request per look while Kueue is not
# installed, and one installed later is seen within seconds (it was 300 s: a Kueue installed
# while the operator ran went unseen for five minutes; its queued jobs said "no Workload yet").
NO_KUEUE_RECHECK = 10.0
# Every call to the apiserver has a deadline: (connect, read) seconds. Without one a lost
# response blocked its caller for good: a start-up LIST that never returned left an operator
# that answered /healthz and never reconciled (seen once in CI, 420 s of silence).
REQUEST_TIMEOUT = (10.0, 60.0)
EVENT_BACKLOG = 1000  # Events waiting to be sent; past it new ones are dropped (and counted)


class NotOwned(RuntimeError):
    """A child's deterministic name is taken by an object some other owner controls."""


def controller_uid(obj: dict) -> str | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


def path(kind: str, namespace: str | None = None, name: str | None = None,
         subresource: str | None = None, everywhere: bool = False) -> tuple[str, dict[str, str]]:
    """The request path of `kind` (a collection, in one namespace or `everywhere`, or one
    object and its subresource) as a template and its parameters: the client quotes each one,
    so no name leaves its segment."""
    prefix, plural, namespaced = RESOURCES[kind]
    template, params = prefix, {}
    if namespaced and not (everywhere and name is None):
        if not namespace:
            raise ValueError(f"{kind} is namespaced: no namespace given")
        template, params["namespace"] = template + "/namespaces/{namespace}", namespace
    template += f"/{plural}"
    if name is not None:
        template, params["name"] = template + "/{name}", name
        if subresource:
            template += f"/{subresource}"
    return template, params


class Kube:
    def __init__(self, api: client.ApiClient):
        self.api = api
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        # Events are sent by one thread of their own, as client-go's recorder does: a
        # reconcile never waits for one (they were a quarter of its round trips).
        self._events: queue.Queue = queue.Queue(EVENT_BACKLOG)
        self._sender: threading.Thread | None = None
        self._no_kueue_until = 0.0

    def _count(self, verb: str) -> None:
        from .metrics import API_REQUESTS

        with self._lock:
            self.requests[verb] += 1
        API_REQUESTS.labels(verb=verb).inc()

    def _request(self, method: str, kind: str, namespace: str | None = None,
                 name: str | None = None, *, subresource: str | None = None,
                 body=None, query: dict | None = None, content_type: str = "application/json",
                 everywhere: bool = False):
        """One call to the apiserver, its answer as plain JSON (dicts and lists, the wire
        format, timestamps as the server wrote them, the same as watch events); a status of
        400 or more raises ApiException, as the generated client does. The generated client's
        methods are not used: each validated our dict into its pydantic model and serialized
        it back (a tenth of the operator's CPU at 500 jobs, more than the request itself), and
        built models of the answer before that was turned off."""
        template, params = path(kind, namespace, name, subresource, everywhere)
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        _, url, headers, _, _ = self.api.param_serialize(
            method, template, path_params=params,
            query_params=[(k, v) for k, v in (query or {}).items() if v is not None] or None,
            header_params=headers, auth_settings=["BearerToken"])
        response = self.api.rest_client.request(method, url, headers=headers, body=body,
                                                _request_timeout=REQUEST_TIMEOUT)
        try:
            data = response.read()
        finally:
            response.response.release_conn()
        if not 200 <= response.status < 300:
            raise ApiException(http_resp=response)
        return json.loads(data) if data else None

    def admission_policy_bound(self, name: str) -> bool:
        """Whether the ValidatingAdmissionPolicy `name` and a binding of the same name that
        denies exist (False when they do not, or when this identity may not read them)."""
        try:
            self._count("get")
            self._request("GET", "ValidatingAdmissionPolicy", name=name)
            self._count("get")
            bound = self._request("GET", "ValidatingAdmissionPolicyBinding", name=name)
        except ApiException as exc:
            if exc.status in (403, 404):
                return False
            raise
        spec = (bound or {}).get("spec") or {}
        return spec.get("policyName") == name and "Deny" in (spec.get("validationActions") or [])

    # ---- generic ---------------------------------------------------------------------------
    def create(self, obj: dict) -> bool:
        """Create; True if created, False if it already existed (a deterministic name)."""
        kind, ns = obj["kind"], obj["metadata"].get("namespace")
        if kind not in CREATABLE:
            raise ValueError(f"no create for kind {kind}")
        self._count("create")
        try:
            self._request("POST", kind, ns, body=obj)
        except ApiException as exc:
            if exc.status != 409:
                raise
            # The name is taken: ours (an earlier reconcile) is fine; anything else is not
            # adopted, whatever labels it carries.
            owner = controller_uid(obj)
            existing = self._read(kind, ns, obj["metadata"]["name"]) if owner else None
            if existing is not None and controller_uid(existing) != owner:
                raise NotOwned(f"{kind} {ns}/{obj['metadata']['name']} already exists and is "
                               f"not controlled by this object (uid {owner}); delete or "
                               f"rename it") from None
            return False
        return True

    def _read(self, kind: str, ns: str, name: str) -> dict | None:
        self._count("get")
        try:
            return self._request("GET", kind, ns, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch(self, obj: dict, patch: dict) -> str | None:
        """Patch; returns the new resourceVersion (None if the object is gone)."""
        kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
        if kind not in ("Job", "Deployment", "Workload", *PLURALS):
            raise ValueError(f"no patch for kind {kind}")
        self._count("patch")
        try:
            out = self._request("PATCH", kind, ns, name, body=patch, content_type=(
                STRATEGIC_PATCH if kind in ("Job", "Deployment") else MERGE_PATCH))
        except ApiException as exc:
            if exc.status != 404:
                raise
            return None
        return out["metadata"]["resourceVersion"]

    def patch_status(self, kind: str, ns: str, name: str, status: dict,
                     resource_version: str | None = None) -> bool:
        """Merge-patch status; with resource_version, only if nobody wrote in between (False
        on a conflict: the caller looks again at the newer object)."""
        self._count("patch_status")
        body: dict = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            self._request("PATCH", kind, ns, name, subresource="status", body=body,
                          content_type=MERGE_PATCH)
        except ApiException as exc:
            if exc.status == 409:
                return False
            if exc.status != 404:
                raise
        return True

    def delete(self, obj: dict) -> None:
        """Delete a child in the background (its dependents go after it): only the very
        object given (its uid as a precondition), so a newer one of the same name is never
        hit. Gone already, or replaced: nothing to do."""
        kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
        if kind != "Job":
            raise ValueError(f"no delete for kind {kind}")
        options: dict = {"propagationPolicy": "Background"}
        if obj["metadata"].get("uid"):
            options["preconditions"] = {"uid": obj["metadata"]["uid"]}
        self._count("delete")
        try:
            self._request("DELETE", kind, ns, name, body=options)
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def delete_custom(self, kind: str, ns: str, name: str) -> None:
        self._count("delete")
        try:
            self._request("DELETE", kind, ns, name, body={"propagationPolicy": "Background"})
        except ApiException as exc:
            if exc.status != 404:
                raise

    def get_custom(self, kind: str, ns: str, name: str) -> dict | None:
        return self._read(kind, ns, name)

    def runtime(self, kind: str, ns: str, name: str) -> dict | None:
        """A ClusterFineTuneRuntime, or a FineTuneRuntime in `ns`; None when there is none
        (or when this identity may not read it: a namespaced install reads no cluster
        objects)."""
        if kind not in ("ClusterFineTuneRuntime", "FineTuneRuntime"):
            raise ValueError(f"no runtime kind {kind}")
        self._count("get")
        try:
            return self._request("GET", kind, ns if kind == "FineTuneRuntime" else None, name)
        except ApiException as exc:
            if exc.status in (403, 404):
                return None
            raise

    def get_deployment(self, ns: str, name: str) -> dict | None:
        return self._read("Deployment", ns, name)

    def secret_data(self, ns: str, name: str) -> dict[str, str]:
        import base64

        self._count("get")
        secret = self._request("GET", "Secret", ns, name)
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}

    def list(self, kind: str, label_selector: str, namespace: str | None = None) -> list[dict]:
        """Every object of `kind` matching the selector (page by page, 500 at a time)."""
        api_version = RESOURCES[kind][0].removeprefix("/apis/").removeprefix("/api/")
        items, token = [], None
        while True:
            self._count("list")
            query = {"labelSelector": label_selector or None, "limit": 500, "continue": token}
            page = self._request("GET", kind, namespace, query=query,
                                 everywhere=not namespace)
            for item in page.get("items") or []:
                # A list's items carry no kind (a watch event's do): what is cached from a
                # LIST must look the same, e.g. for a later patch of it.
                item.setdefault("kind", kind)
                item.setdefault("apiVersion", api_version)
                items.append(item)
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items

    def workloads(self, ns: str, label_selector: str) -> list[dict] | None:
        """Kueue's Workloads; None where Kueue's Workload API is not served (not installed)."""
        if time.monotonic() < self._no_kueue_until:
            return None
        self._count("list")
        try:
            page = self._request("GET", "Workload", ns,
                                 query={"labelSelector": label_selector, "limit": 50})
        except ApiException as exc:
            if exc.status != 404:
                raise
            self._no_kueue_until = time.monotonic() + NO_KUEUE_RECHECK  # not installed
            return None
        items = page.get("items") or []
        for item in items:
            item.setdefault("kind", "Workload")
            item.setdefault("apiVersion", f"{KUEUE_GROUP}/{KUEUE_VERSION}")
        return items

    def event(self, body: dict, kind: str, reason: str, message: str) -> None:
        """A core/v1 Event on the object (what `kubectl describe` shows), sent in the
        background: built now (the object may change after), best effort, never blocking."""
        meta = body["metadata"]
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                               "name": meta["name"], "namespace": meta["namespace"],
                               "uid": meta["uid"]},
            "type": kind, "reason": reason, "message": message[:1024],
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
            "source": {"component": "kubetune-operator"},
            "reportingComponent": "kubetune.io/operator", "reportingInstance": "kubetune"}
        with self._lock:
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_events, daemon=True,
                                                name="kubetune-events")
                self._sender.start()
        try:
            self._events.put_nowait(event)
        except queue.Full:
            self._count("event_dropped")

    def _send_events(self) -> None:
        while True:
            event = self._events.get()
            try:
                self._count("event")
                self._request("POST", "Event", event["metadata"]["namespace"], body=event)
            except Exception:  # noqa: BLE001 - Events are best effort; the sender lives on
                pass
            finally:
                self._events.task_done()

    def flush_events(self, timeout: float = 10.0) -> bool:
        """Wait until every queued Event was sent (or failed); False if `timeout` passed."""
        import time

        deadline = time.monotonic() + timeout
        while self._events.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True
