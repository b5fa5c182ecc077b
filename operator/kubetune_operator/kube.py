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

GROUP, VERSION = "kubetune.io", "v1alpha1"
PLURALS = {"FineTuneJob": "finetunejobs", "LoRAAdapter": "loraadapters"}
KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta2"
NO_KUEUE_RECHECK = 300.0  # seconds before asking again whether Kueue is installed
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


class Kube:
    def __init__(self, api: client.ApiClient):
        self.api = api
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.apps = client.AppsV1Api(api)
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

    @staticmethod
    def _json(call, *args, **kwargs):
        """Call a client method and return the response as plain JSON (dicts and lists, the
        wire format, timestamps as the server wrote them, the same as watch events): the
        client's model classes are never built, which cost more CPU than the request itself
        (a Job's response is thousands of attribute assignments and date parses)."""
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
        response = call(*args, _preload_content=False, **kwargs)
        try:
            data = response.data
        finally:
            response.release_conn()
        return json.loads(data) if data else None

    def admission_policy_bound(self, name: str) -> bool:
        """Whether the ValidatingAdmissionPolicy `name` and a binding of the same name that
        denies exist (False when they do not, or when this identity may not read them)."""
        admission = client.AdmissionregistrationV1Api(self.api)
        try:
            self._count("get")
            self._json(admission.read_validating_admission_policy, name)
            self._count("get")
            bound = self._json(admission.read_validating_admission_policy_binding, name)
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
        create = {"ServiceAccount": self.core.create_namespaced_service_account,
                  "Service": self.core.create_namespaced_service,
                  "Role": self.rbac.create_namespaced_role,
                  "RoleBinding": self.rbac.create_namespaced_role_binding,
                  "Job": self.batch.create_namespaced_job}.get(kind)
        if create is None and kind not in PLURALS:
            raise ValueError(f"no create for kind {kind}")
        self._count("create")
        try:
            if create is not None:
                self._json(create, ns, obj)
            else:
                self._json(self.custom.create_namespaced_custom_object, GROUP, VERSION, ns,
                           PLURALS[kind], obj)
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
        read = {"ServiceAccount": self.core.read_namespaced_service_account,
                "Service": self.core.read_namespaced_service,
                "Role": self.rbac.read_namespaced_role,
                "RoleBinding": self.rbac.read_namespaced_role_binding,
                "Job": self.batch.read_namespaced_job,
                "Deployment": self.apps.read_namespaced_deployment}.get(kind)
        if read is None:
            return self.get_custom(kind, ns, name)
        self._count("get")
        try:
            return self._json(read, name, ns)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch(self, obj: dict, patch: dict) -> str | None:
        """Patch; returns the new resourceVersion (None if the object is gone)."""
        kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
        self._count("patch")
        try:
            if kind == "Job":
                out = self._json(self.batch.patch_namespaced_job, name, ns, patch)
            elif kind == "Deployment":
                out = self._json(self.apps.patch_namespaced_deployment, name, ns, patch)
            elif kind in PLURALS:
                out = self._json(self.custom.patch_namespaced_custom_object, GROUP, VERSION, ns,
                                 PLURALS[kind], name, patch)
            elif kind == "Workload":
                out = self._json(self.custom.patch_namespaced_custom_object, KUEUE_GROUP,
                                 KUEUE_VERSION, ns, "workloads", name, patch)
            else:
                raise ValueError(f"no patch for kind {kind}")
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
            self._json(self.custom.patch_namespaced_custom_object_status,
                       GROUP, VERSION, ns, PLURALS[kind], name, body)
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
        delete = {"Job": self.batch.delete_namespaced_job}.get(kind)
        if delete is None:
            raise ValueError(f"no delete for kind {kind}")
        options: dict = {"propagationPolicy": "Background"}
        if obj["metadata"].get("uid"):
            options["preconditions"] = {"uid": obj["metadata"]["uid"]}
        self._count("delete")
        try:
            self._json(delete, name, ns, body=options)
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def delete_custom(self, kind: str, ns: str, name: str) -> None:
        self._count("delete")
        try:
            self._json(self.custom.delete_namespaced_custom_object, GROUP, VERSION, ns,
                       PLURALS[kind], name, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise

    def get_custom(self, kind: str, ns: str, name: str) -> dict | None:
        self._count("get")
        try:
            return self._json(self.custom.get_namespaced_custom_object, GROUP, VERSION, ns,
                              PLURALS[kind], name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def runtime(self, kind: str, ns: str, name: str) -> dict | None:
        """A ClusterFineTuneRuntime, or a FineTuneRuntime in `ns`; None when there is none
        (or when this identity may not read it: a namespaced install reads no cluster
        objects)."""
        self._count("get")
        try:
            if kind == "ClusterFineTuneRuntime":
                return self._json(self.custom.get_cluster_custom_object, GROUP, VERSION,
                                  "clusterfinetuneruntimes", name)
            return self._json(self.custom.get_namespaced_custom_object, GROUP, VERSION, ns,
                              "finetuneruntimes", name)
        except ApiException as exc:
            if exc.status in (403, 404):
                return None
            raise

    def get_deployment(self, ns: str, name: str) -> dict | None:
        return self._read("Deployment", ns, name)

    def secret_data(self, ns: str, name: str) -> dict[str, str]:
        import base64

        self._count("get")
        secret = self._json(self.core.read_namespaced_secret, name, ns)
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}

    def list(self, kind: str, label_selector: str, namespace: str | None = None) -> list[dict]:
        """Every object of `kind` matching the selector (page by page, 500 at a time)."""
        namespaced, everywhere, api_version = {
            "Job": (self.batch.list_namespaced_job, self.batch.list_job_for_all_namespaces,
                    "batch/v1"),
            "Pod": (self.core.list_namespaced_pod, self.core.list_pod_for_all_namespaces, "v1"),
            "Deployment": (self.apps.list_namespaced_deployment,
                           self.apps.list_deployment_for_all_namespaces, "apps/v1")}[kind]
        items, token = [], None
        while True:
            self._count("list")
            extra = {"_continue": token} if token else {}
            if namespace:
                page = self._json(namespaced, namespace, label_selector=label_selector,
                                  limit=500, **extra)
            else:
                page = self._json(everywhere, label_selector=label_selector, limit=500,
                                  **extra)
            for item in page.get("items") or []:
                # A list's items carry no kind (a watch event's do): what is cached from a
                # LIST must look the same, e.g. for a later patch of it.
                item.setdefault("kind", kind)
                item.setdefault("apiVersion", api_version)
                items.append(item)
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items

    def workloads(self, ns: str, label_selector: str) -> list[dict]:
        """Kueue's Workloads ([] where Kueue is not installed)."""
        if time.monotonic() < self._no_kueue_until:
            return []
        self._count("list")
        try:
            page = self._json(self.custom.list_namespaced_custom_object, KUEUE_GROUP,
                              KUEUE_VERSION, ns, "workloads",
                              label_selector=label_selector, limit=50)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self._no_kueue_until = time.monotonic() + NO_KUEUE_RECHECK  # not installed
            return []
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
                self._json(self.core.create_namespaced_event,
                           event["metadata"]["namespace"], event)
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
