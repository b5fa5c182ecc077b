"""Builders of a FineTuneJob's children: plain dicts with our labels, owner references and
deterministic names (a repeated create hits 409 instead of duplicating work)."""

from __future__ import annotations

from kubetune.api import trainerstatus
from kubetune.api.finetunejob import FineTuneJob
from kubetune.contract import ExitCode
from kubetune.trainerconfig import from_finetunejob

from ..settings import OperatorSettings
from .pods import GPU_TOLERATION, TERMINATION_LOG, restricted_pod, s3_env, trainer_container

GROUP = "kubetune.io"
LABEL_JOB = "kubetune.io/finetunejob"
LABEL_ATTEMPT = "kubetune.io/attempt"
LABEL_COMPONENT = "app.kubernetes.io/component"
# The operator's seal on status.artifact: the trainer's token may patch the status subresource
# (progress), never the object's metadata, so an artifact it forged in status does not match.
ANNOTATION_ARTIFACT_SEAL = "kubetune.io/artifact-seal"
# The rendered trainer config travels in the attempt's pod template (a downward-API file): each
# attempt carries the config it was started with, and no ConfigMap is created per job.
ANNOTATION_CONFIG = "kubetune.io/trainer-config"
ANNOTATION_TRACKING_RUN = "kubetune.io/tracking-run-id"
# The FineTuneJob generation an attempt's Job was built from: a spec changed before the start
# was recorded (status.startTime, after which admission keeps the training inputs) is seen.
ANNOTATION_SPEC_GENERATION = "kubetune.io/spec-generation"
MAX_CONFIG_BYTES = 128 * 1024  # well inside the 256 KiB the API allows for all annotations


def artifact_seal(artifact: dict) -> str:
    import hashlib
    import json

    return "sha256:" + hashlib.sha256(json.dumps(artifact, sort_keys=True,
                                                 separators=(",", ":")).encode()).hexdigest()


def sealed_artifact(body: dict) -> dict | None:
    """status.artifact if the operator sealed it, else None (absent, or written by someone
    else)."""
    artifact = (body.get("status") or {}).get("artifact")
    seal = ((body.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_ARTIFACT_SEAL)
    if not isinstance(artifact, dict) or not seal or artifact_seal(artifact) != seal:
        return None
    return artifact
KUEUE_API = "kueue.x-k8s.io/v1beta2"  # the Workload API this operator reads (Kueue >= 0.15)
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
KUEUE_JOB_UID = "kueue.x-k8s.io/job-uid"  # Kueue labels a Job's Workload with the Job's uid
CONFIG_MOUNT = "/etc/kubetune"
RDZV_PORT = 29500
MAX_NAME = 50  # leaves room for "-<attempt>" and the pod suffix within 63 characters


def job_name(name: str, attempt: int) -> str:
    return f"{name}-{attempt}"


def trainer_account(name: str) -> str:
    return f"{name}{trainerstatus.TRAINER_SUFFIX}"


def labels(name: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/managed-by": "kubetune",
            LABEL_COMPONENT: component, LABEL_JOB: name}


def owner_reference(body: dict) -> dict:
    meta = body["metadata"]
    return {"apiVersion": body.get("apiVersion", f"{GROUP}/v1alpha1"),
            "kind": body.get("kind", "FineTuneJob"), "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def _meta(body: dict, name: str, component: str, extra_labels: dict | None = None) -> dict:
    return {"name": name, "namespace": body["metadata"]["namespace"],
            "labels": {**labels(body["metadata"]["name"], component), **(extra_labels or {})},
            "ownerReferences": [owner_reference(body)]}


def trainer_config(job: FineTuneJob, body: dict, settings: OperatorSettings) -> str:
    cfg = from_finetunejob(job, namespace=body["metadata"]["namespace"], status_sink=True,
                           termination_log=TERMINATION_LOG)
    if not cfg.output.endpoint and settings.s3_endpoint:
        cfg.output.endpoint = settings.s3_endpoint
    if not cfg.output.region:
        cfg.output.region = settings.s3_region
    rendered = cfg.dump()
    if len(rendered.encode()) > MAX_CONFIG_BYTES:
        raise ValueError(f"the trainer config renders to {len(rendered.encode())} bytes, more "
                         f"than {MAX_CONFIG_BYTES} (shorten spec.dataset.chatTemplate)")
    return rendered


def rbac(body: dict, shared: bool = False) -> list[dict]:
    """The trainer may patch only its own job's status. Per job: a ServiceAccount, a Role that
    names the job and its RoleBinding. `shared` (the trainer-status admission policy is
    installed): the ServiceAccount and the namespace's one RoleBinding, the policy narrowing
    each ServiceAccount to its own job (kubetune/api/trainerstatus.py)."""
    name = body["metadata"]["name"]
    account = trainer_account(name)
    if shared:
        return [{"apiVersion": "v1", "kind": "ServiceAccount",
                 "metadata": _meta(body, account, "trainer")},
                trainerstatus.namespace_binding(body["metadata"]["namespace"])]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(body, account, "trainer")},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": _meta(body, account, "trainer"),
         "rules": [{"apiGroups": [GROUP], "resources": ["finetunejobs/status"],
                    "resourceNames": [name], "verbs": ["get", "patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": _meta(body, account, "trainer"),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
         "subjects": [{"kind": "ServiceAccount", "name": account,
                       "namespace": body["metadata"]["namespace"]}]},
    ]


def _credentials_env(job: FineTuneJob, settings: OperatorSettings) -> list[dict]:
    out = job.spec.output
    secret = out.credentials_secret.name if out.credentials_secret else \
        settings.s3_credentials_secret
    env = s3_env(secret, out.endpoint or settings.s3_endpoint, out.region or settings.s3_region)
    if job.spec.base_model.credentials_secret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": job.spec.base_model.credentials_secret.name, "key": "HF_TOKEN",
            "optional": True}}})
    return env + tracking_env(job)


TRACKING_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def tracking_env(job: FineTuneJob) -> list[dict]:
    """spec.tracking.mlflow.credentialsSecret's keys as env (each optional: a Secret holds a
    user and password, or a token). The operator never reads them."""
    mlflow = job.spec.tracking.mlflow if job.spec.tracking else None
    if mlflow is None or mlflow.credentials_secret is None:
        return []
    return [{"name": key, "valueFrom": {"secretKeyRef": {
        "name": mlflow.credentials_secret.name, "key": key, "optional": True}}}
        for key in TRACKING_KEYS]


def training_job(job: FineTuneJob, body: dict, attempt: int, settings: OperatorSettings,
                 suspend: bool, config: str | None = None) -> dict:
    """Attempt `attempt`'s Job; `config`: the rendered trainer config (rendered when None)."""
    spec = job.spec
    res = spec.resources
    name = body["metadata"]["name"]
    jname = job_name(name, attempt)
    nodes = res.nodes
    limits: dict[str, str] = {}
    if res.gpus_per_node:
        limits["nvidia.com/gpu"] = str(res.gpus_per_node)
    if res.cpu is not None:
        limits["cpu"] = str(res.cpu)
    if res.memory is not None:
        limits["memory"] = str(res.memory)
    train_args = ["train", "--config", f"{CONFIG_MOUNT}/config.yaml",
                  "--set", f"logging.status.attempt={attempt}"]
    command = list(settings.trainer_command)
    env = _credentials_env(job, settings) + [
        {"name": "KUBETUNE_ATTEMPT", "value": str(attempt)},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    if nodes > 1:
        # torchrun across the indexed Job's pods; rank 0 is reachable as <job>-0.<job>.
        python = command[0]
        command = [python, "-m", "torch.distributed.run"]
        train_args = [f"--nnodes={nodes}", f"--nproc_per_node={max(res.gpus_per_node, 1)}",
                      "--node_rank=$(JOB_COMPLETION_INDEX)",
                      f"--master_addr={jname}-0.{jname}", f"--master_port={RDZV_PORT}",
                      "-m", "kubetune_trainer", *train_args]
        env += [{"name": "MASTER_ADDR", "value": f"{jname}-0.{jname}"},
                {"name": "MASTER_PORT", "value": str(RDZV_PORT)},
                {"name": "NNODES", "value": str(nodes)}]
    tolerations = [t.wire() for t in res.tolerations or []]
    if res.gpus_per_node and settings.gpu_tolerations and not any(
            t.get("key") == "nvidia.com/gpu" for t in tolerations):
        tolerations.append(dict(GPU_TOLERATION))
    container = trainer_container(
        "trainer", res.image or settings.trainer_image, command, train_args, env,
        [{"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True}], limits)
    config_file = {"path": "config.yaml", "fieldRef": {
        "fieldPath": f"metadata.annotations['{ANNOTATION_CONFIG}']"}}
    pod_spec = restricted_pod(
        container, [{"name": "config", "downwardAPI": {"items": [config_file]}}],
        service_account=res.service_account_name or trainer_account(name),
        api_token=True,  # progress goes to the FineTuneJob's status with the pod's token
        grace_seconds=120,  # time to write a checkpoint on SIGTERM
        node_selector=dict(res.node_selector or {}) or dict(settings.default_node_selector),
        tolerations=tolerations)
    if res.affinity:
        pod_spec["affinity"] = res.affinity
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    if nodes > 1:
        pod_spec["subdomain"] = jname
    extra = {LABEL_ATTEMPT: str(attempt)}
    if spec.scheduling.queue_name:
        extra[KUEUE_QUEUE] = spec.scheduling.queue_name
    job_spec = {
        "backoffLimit": 0,  # retries are attempts of ours, with checkpoints and accounting
        "completions": nodes, "parallelism": nodes,
        "suspend": suspend,
        "podFailurePolicy": {"rules": [
            # Preemption, eviction, node loss: end the attempt without counting it.
            {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget"}]},
            # Invalid input (data, model, config): never worth a retry.
            {"action": "FailJob", "onExitCodes": {"containerName": "trainer",
                                                  "operator": "In",
                                                  "values": [int(ExitCode.INVALID)]}},
        ]},
        "template": {"metadata": {"labels": {**labels(name, "trainer"), **extra},
                                  "annotations": {
                                      ANNOTATION_CONFIG: config or
                                      trainer_config(job, body, settings)}},
                     "spec": pod_spec},
    }
    if nodes > 1:
        job_spec["completionMode"] = "Indexed"
    if spec.scheduling.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.scheduling.active_deadline_seconds
    meta = _meta(body, jname, "trainer", extra)
    if body["metadata"].get("generation") is not None:
        meta["annotations"] = {ANNOTATION_SPEC_GENERATION: str(body["metadata"]["generation"])}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def built_from(job: dict) -> int | None:
    """The FineTuneJob generation a Job was built from (None: not recorded, e.g. a Job an
    older operator created)."""
    value = ((job.get("metadata") or {}).get("annotations") or {}).get(
        ANNOTATION_SPEC_GENERATION)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def headless_service(body: dict, attempt: int) -> dict:
    jname = job_name(body["metadata"]["name"], attempt)
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(body, jname, "rendezvous"),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {"batch.kubernetes.io/job-name": jname},
                     "ports": [{"name": "rdzv", "port": RDZV_PORT}]}}


def lora_adapter(job: FineTuneJob, body: dict, artifact: dict) -> dict:
    """The LoRAAdapter recorded on success: pinned to the manifest digest and base revision.
    No owner reference: a served adapter outlives the job that trained it."""
    create = job.spec.output.create_adapter
    name = create.name.replace("{job}", body["metadata"]["name"])
    spec = {
        "baseModel": {"uri": artifact["baseModelUri"],
                      **({"revision": artifact["baseModelRevision"]}
                         if artifact.get("baseModelRevision") else {})},
        "source": {"uri": artifact["uri"], "sha256": artifact["manifestSha256"],
                   **({"endpoint": job.spec.output.endpoint} if job.spec.output.endpoint else {}),
                   **({"credentialsSecret": job.spec.output.credentials_secret.wire()}
                      if job.spec.output.credentials_secret else {})},
        "servingName": create.serving_name or name,
        "stage": create.stage, "mode": create.mode,
    }
    for key, value in (("alias", create.alias), ("target", create.target),
                       ("compatibility", create.compatibility), ("rollout", create.rollout),
                       ("promotion", create.promotion)):
        if value is not None:
            spec[key] = value if isinstance(value, str) else value.wire()
    annotations = {"kubetune.io/source-uid": body["metadata"]["uid"]}
    if artifact.get("trackingRunId"):  # lineage: the run the verified manifest names
        annotations[ANNOTATION_TRACKING_RUN] = artifact["trackingRunId"]
    return {"apiVersion": f"{GROUP}/v1alpha1", "kind": "LoRAAdapter",
            "metadata": {"name": name, "namespace": body["metadata"]["namespace"],
                         "labels": labels(body["metadata"]["name"], "adapter"),
                         "annotations": annotations},
            "spec": spec}
