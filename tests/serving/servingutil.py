"""A `kubetune serve` Deployment on the real node, from the dev cluster's `serve` image, and
readers of what its replicas serve (by pod IP: this machine routes to the node's pod range)."""

from __future__ import annotations

import json
import os

from kubernetes import client

from helpers import request_json, wait_for

REAL_NODE = {"kubetune.io/real-node": "true"}
PROMPT = "What color is the apple?"
# The restricted Pod Security Standard, as the images run: non-root, read-only root.
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}


def image(target: str) -> str:
    """The dev cluster's image of a Dockerfile target (exported by the cluster fixture)."""
    return os.environ[f"KUBETUNE_{target.upper()}_IMAGE"]


def serve_deployment(name: str, replicas: int = 2, model: str = "builtin://tiny-llama",
                     max_rank: int = 16, endpoint: str = "") -> dict:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        # opted in to LoRAAdapters (the operator's policy changes no other Deployment)
        "metadata": {"name": name, "labels": {"app": name, "kubetune.io/adapter-target": "true"}},
        "spec": {
            "replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {
                "nodeSelector": REAL_NODE, "terminationGracePeriodSeconds": 5,
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                 "effect": "NoSchedule"}],
                "securityContext": POD_SECURITY,
                "containers": [{
                    "name": "server", "image": image("serve"),  # entrypoint `kubetune serve`
                    "args": ["--model", model, "--revision", "v1", "--served-model-name", "base",
                             "--host", "$(POD_IP)", "--port", "8000",
                             f"--max-lora-rank={max_rank}", "--cache-dir", "/cache"],
                    "securityContext": CONTAINER_SECURITY,
                    "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {
                                "fieldPath": "status.podIP"}}},
                            {"name": "AWS_ENDPOINT_URL_S3", "value": endpoint},
                            *[{"name": k, "valueFrom": {"secretKeyRef": {"name": "s3-creds",
                                                                         "key": k}}}
                              for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]],
                    "ports": [{"containerPort": 8000, "name": "http"}],
                    "readinessProbe": {"httpGet": {"path": "/health", "port": 8000},
                                       "periodSeconds": 1},
                    "volumeMounts": [{"name": "cache", "mountPath": "/cache"},
                                     {"name": "tmp", "mountPath": "/tmp"}]}],
                "volumes": [{"name": "cache", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]}}}}


def create_deployment(cluster, ns: str, body: dict) -> None:
    client.AppsV1Api(cluster.api).create_namespaced_deployment(ns, body)


def ready_pods(cluster, ns: str, app: str) -> list[dict]:
    pods = client.CoreV1Api(cluster.api).list_namespaced_pod(ns, label_selector=f"app={app}")
    out = []
    for p in pods.items:
        if p.metadata.deletion_timestamp or not p.status.pod_ip:
            continue
        if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or []):
            out.append({"name": p.metadata.name, "ip": p.status.pod_ip})
    return out


def wait_ready(cluster, ns: str, app: str, count: int, timeout: float = 180) -> list[dict]:
    return wait_for(lambda: (pods := ready_pods(cluster, ns, app)) and len(pods) == count
                    and pods, timeout=timeout, message=f"{count} ready {app} pods")


def call(where: str, path: str, body: dict | None = None, timeout: float = 120,
         key: str | None = None):
    """JSON request to a server: `where` is a base URL, or a pod IP (port 8000); `key`: sent
    as `Authorization: Bearer`."""
    base = where if where.startswith("http") else f"http://{where}:8000"
    return request_json(base + path, body, timeout, key)


def models(ip: str) -> set[str]:
    return {m["id"] for m in call(ip, "/v1/models", timeout=5)[1]["data"] if m.get("parent")}


def complete(where: str, model: str, prompt: str = PROMPT) -> str:
    status, body = call(where, "/v1/completions", {"model": model, "prompt": prompt,
                                                   "max_tokens": 8, "temperature": 0})
    assert status == 200, body
    return body["choices"][0]["text"]


def adapter(cluster, ns: str, name: str) -> dict:
    return client.CustomObjectsApi(cluster.api).get_namespaced_custom_object(
        "kubetune.io", "v1alpha1", ns, "loraadapters", name)


def condition(obj: dict, kind: str) -> dict:
    return next((c for c in (obj.get("status") or {}).get("conditions") or []
                 if c["type"] == kind), {})


def events(cluster, ns: str, name: str) -> list:
    return [e for e in client.CoreV1Api(cluster.api).list_namespaced_event(ns).items
            if e.involved_object.name == name]


def wait_condition(cluster, ns: str, name: str, kind: str, status: str = "True",
                   timeout: float = 60, op=None) -> dict:
    """The adapter, once its condition `kind` has `status`. On timeout the failure carries
    explain() when the operator `op` is given."""
    try:
        return wait_for(lambda: (a := adapter(cluster, ns, name)) and
                        condition(a, kind).get("status") == status and a, timeout=timeout,
                        message=f"{name} {kind}={status}")
    except AssertionError as exc:
        if op is None:
            raise
        raise AssertionError(f"{exc}\n{explain(cluster, ns, name, op)}") from None


def explain(cluster, ns: str, name: str, op) -> str:
    """The adapter's status, Jobs, pods, Events and the operator's log tail (for failures)."""
    a = adapter(cluster, ns, name)
    jobs = client.BatchV1Api(cluster.api).list_namespaced_job(ns).items
    pods = client.CoreV1Api(cluster.api).list_namespaced_pod(ns).items
    events = [(e.involved_object.name, e.reason, e.message)
              for e in client.CoreV1Api(cluster.api).list_namespaced_event(ns).items]
    return (f"status: {json.dumps(a.get('status'), indent=1)}\njobs: "
            f"{[(j.metadata.name, j.status.conditions) for j in jobs]}\npods: "
            f"{[(p.metadata.name, p.status.phase, p.status.container_statuses) for p in pods]}"
            f"\nevents: {events}\noperator: {op.tail(30)}")
