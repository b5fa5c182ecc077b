"""Builders of a LoRAAdapter's children: the merge Job (merged mode), from the same pieces as
the training Job (resources/pods.py), with a deterministic name per adapter digest."""

from __future__ import annotations

from ..settings import OperatorSettings
from .pods import GPU_TOLERATION, restricted_pod, s3_env, trainer_container

LABEL_ADAPTER = "kubetune.io/loraadapter"


def merge_job_name(name: str, digest: str) -> str:
    return f"{name[:40]}-merge-{digest[:8]}"


def merge_job(body: dict, adapter, digest: str, adapter_uri: str, out_uri: str,
              settings: OperatorSettings) -> dict:
    """Merge the verified adapter (pinned by its manifest digest) into its base model and
    publish the result with a manifest naming that digest."""
    meta = body["metadata"]
    src = adapter.spec.source
    secret = src.credentials_secret.name if src.credentials_secret else \
        settings.s3_credentials_secret
    env = s3_env(secret, src.endpoint or settings.s3_endpoint, settings.s3_region)
    args = ["merge", "--base-uri", adapter.spec.base_model.uri, "--adapter-uri", adapter_uri,
            "--adapter-sha256", digest,  # the manifest the operator verified, no other
            "--out-uri", out_uri, "--work-dir", "/work"]
    if adapter.spec.base_model.revision:
        args += ["--revision", adapter.spec.base_model.revision]
    container = trainer_container("merge", settings.trainer_image, settings.trainer_command,
                                  args, env, [{"name": "work", "mountPath": "/work"}])
    pod_spec = restricted_pod(
        container, [{"name": "work", "emptyDir": {}}],
        api_token=False,  # the merge talks to S3 only
        node_selector=settings.merge_node_selector,
        # merge nodes are usually the GPU nodes
        tolerations=[dict(GPU_TOLERATION)] if settings.gpu_tolerations else None)
    labels = {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/managed-by": "kubetune",
              "app.kubernetes.io/component": "merge", LABEL_ADAPTER: meta["name"]}
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": merge_job_name(meta["name"], digest),
                         "namespace": meta["namespace"], "labels": labels,
                         "ownerReferences": [{"apiVersion": body["apiVersion"],
                                              "kind": body["kind"], "name": meta["name"],
                                              "uid": meta["uid"], "controller": True,
                                              "blockOwnerDeletion": True}]},
            "spec": {"backoffLimit": 1, "ttlSecondsAfterFinished": 3600,
                     "activeDeadlineSeconds": int(settings.merge_deadline_seconds),
                     "template": {"metadata": {"labels": labels}, "spec": pod_spec}}}
