"""The one module that talks to the Kubernetes API: creates that tolerate 409, patches and
deletes that tolerate 404, status patches, Events. It counts its requests (for benchmarks and
metrics)."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import datetime, timezone

from kubernetes import client
from kubernetes.client.rest import ApiException

GROUP, VERSION = "kubetune.io", "v1alpha1"
PLURALS = {"FineTuneJob": "finetunejobs", "LoRAAdapter": "loraadapters"}


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

    def _count(self, verb: str) -> None:
        from .metrics import API_REQUESTS

        with self._lock:
            self.requests[verb] += 1
        API_REQUESTS.labels(verb=verb).inc()

    # ---- generic ---------------------------------------------------------------------------
    def create(self, obj: dict) -> bool:
        """Create; True if created, False if it already existed (a deterministic name)."""
        kind, ns = obj["kind"], obj["metadata"].get("namespace")
        self._count("create")
        try:
            if kind == "ConfigMap":
                self.core.create_namespaced_config_map(ns, obj)
            elif kind == "ServiceAccount":
                self.core.create_namespaced_service_account(ns, obj)
            elif kind == "Service":
                self.core.create_namespaced_service(ns, obj)
            elif kind == "Role":
                self.rbac.create_namespaced_role(ns, obj)
            elif kind == "RoleBinding":
                self.rbac.create_namespaced_role_binding(ns, obj)
            elif kind == "Job":
                self.batch.create_namespaced_job(ns, obj)
            elif kind in PLURALS:
                self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURALS[kind],
                                                            obj)
            else:
                raise ValueError(f"no create for kind {kind}")
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
        read = {"ConfigMap": self.core.read_namespaced_config_map,
                "ServiceAccount": self.core.read_namespaced_service_account,
                "Service": self.core.read_namespaced_service,
                "Role": self.rbac.read_namespaced_role,
                "RoleBinding": self.rbac.read_namespaced_role_binding,
                "Job": self.batch.read_namespaced_job}.get(kind)
        if read is None:
            return self.get_custom(kind, ns, name)
        self._count("get")
        try:
            return self.api.sanitize_for_serialization(read(name, ns))
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
                out = self.batch.patch_namespaced_job(name, ns, patch)
            elif kind == "Deployment":
                out = self.apps.patch_namespaced_deployment(name, ns, patch)
            elif kind in PLURALS:
                out = self.custom.patch_namespaced_custom_object(GROUP, VERSION, ns,
                                                                 PLURALS[kind], name, patch)
                return out["metadata"]["resourceVersion"]
            else:
                raise ValueError(f"no patch for kind {kind}")
        except ApiException as exc:
            if exc.status != 404:
                raise
            return None
        return out.metadata.resource_version

    def patch_status(self, kind: str, ns: str, name: str, status: dict,
                     resource_version: str | None = None) -> bool:
        """Merge-patch status; with resource_version, only if nobody wrote in between (False
        on a conflict: the caller looks again at the newer object)."""
        self._count("patch_status")
        body: dict = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, ns, PLURALS[kind], name, body)
        except ApiException as exc:
            if exc.status == 409:
                return False
            if exc.status != 404:
                raise
        return True

    def delete_custom(self, kind: str, ns: str, name: str) -> None:
        self._count("delete")
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURALS[kind], name,
                                                        propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise

    def get_custom(self, kind: str, ns: str, name: str) -> dict | None:
        self._count("get")
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURALS[kind],
                                                            name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def get_deployment(self, ns: str, name: str) -> dict | None:
        self._count("get")
        try:
            return self.api.sanitize_for_serialization(
                self.apps.read_namespaced_deployment(name, ns))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def get_job(self, ns: str, name: str) -> dict | None:
        self._count("get")
        try:
            return self.api.sanitize_for_serialization(self.batch.read_namespaced_job(name, ns))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def pods(self, ns: str, match_labels: dict[str, str]) -> list[dict]:
        self._count("list")
        selector = ",".join(f"{k}={v}" for k, v in sorted(match_labels.items()))
        items = self.core.list_namespaced_pod(ns, label_selector=selector)
        return [self.api.sanitize_for_serialization(i) for i in items.items]

    def secret_data(self, ns: str, name: str) -> dict[str, str]:
        import base64

        self._count("get")
        secret = self.core.read_namespaced_secret(name, ns)
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def list(self, kind: str, label_selector: str, namespace: str | None = None) -> list[dict]:
        self._count("list")
        if kind == "Job":
            items = (self.batch.list_namespaced_job(namespace, label_selector=label_selector)
                     if namespace else
                     self.batch.list_job_for_all_namespaces(label_selector=label_selector))
        elif kind == "Pod":
            items = (self.core.list_namespaced_pod(namespace, label_selector=label_selector)
                     if namespace else
                     self.core.list_pod_for_all_namespaces(label_selector=label_selector))
        elif kind == "Deployment":
            items = (self.apps.list_namespaced_deployment(namespace,
                                                          label_selector=label_selector)
                     if namespace else
                     self.apps.list_deployment_for_all_namespaces(label_selector=label_selector))
        else:
            raise ValueError(kind)
        return [self.api.sanitize_for_serialization(i) for i in items.items]

    def event(self, body: dict, kind: str, reason: str, message: str) -> None:
        """A core/v1 Event on the object (what `kubectl describe` shows)."""
        meta = body["metadata"]
        now = datetime.now(timezone.utc)
        self._count("event")
        try:
            self.core.create_namespaced_event(meta["namespace"], {
                "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
                "involvedObject": {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                                   "name": meta["name"], "namespace": meta["namespace"],
                                   "uid": meta["uid"]},
                "type": kind, "reason": reason, "message": message[:1024],
                "firstTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "lastTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "count": 1,
                "source": {"component": "kubetune-operator"},
                "reportingComponent": "kubetune.io/operator", "reportingInstance": "kubetune"})
        except ApiException:
            pass  # Events are best effort
