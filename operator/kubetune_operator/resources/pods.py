"""What every pod the operator creates shares (training Jobs, merge Jobs): the restricted Pod
Security Standard as our images run, a writable /tmp on a read-only root, the trainer's
termination message, the GPU toleration, S3 settings from the environment and a Secret.
Built once here, so a merge Job cannot drift from a training Job."""

from __future__ import annotations

RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                        "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
                        "seccompProfile": {"type": "RuntimeDefault"}}
# The images' user (Dockerfile: USER 65532); fsGroup makes emptyDir volumes its own.
RESTRICTED_POD = {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                  "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}}
TERMINATION_LOG = "/dev/termination-log"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
SCRATCH = {"name": "scratch", "emptyDir": {}}


def s3_env(secret: str | None, endpoint: str | None, region: str) -> list[dict]:
    """S3 settings for the trainer image: the endpoint and region as values, the keys only as
    references to a Secret (never in the pod spec)."""
    env: list[dict] = []
    if secret:
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
                for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    if endpoint:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": endpoint})
    env.append({"name": "AWS_DEFAULT_REGION", "value": region})
    return env


def trainer_container(name: str, image: str, command: list[str], args: list[str],
                      env: list[dict], mounts: list[dict] = (),
                      limits: dict[str, str] | None = None) -> dict:
    """A container of the trainer image: restricted, /tmp on the scratch volume, its summary
    in the termination message (the logs' tail when it died before writing one)."""
    return {"name": name, "image": image, "command": list(command), "args": list(args),
            "env": list(env),
            "resources": {"limits": dict(limits), "requests": dict(limits)} if limits else {},
            "volumeMounts": [*mounts, {"name": SCRATCH["name"], "mountPath": "/tmp"}],
            "securityContext": dict(RESTRICTED_CONTAINER),
            "terminationMessagePath": TERMINATION_LOG,
            "terminationMessagePolicy": "FallbackToLogsOnError"}


def restricted_pod(container: dict, volumes: list[dict] = (), *,
                   service_account: str | None = None, api_token: bool = False,
                   grace_seconds: int = 30, node_selector: dict | None = None,
                   tolerations: list[dict] | None = None) -> dict:
    """A run-to-completion pod spec around `container`. Only a pod that talks to the
    Kubernetes API (`api_token`, the trainer's progress) gets a service-account token."""
    spec = {"restartPolicy": "Never", "automountServiceAccountToken": api_token,
            "terminationGracePeriodSeconds": grace_seconds,
            "securityContext": dict(RESTRICTED_POD), "containers": [container],
            "volumes": [*volumes, dict(SCRATCH)]}
    if service_account:
        spec["serviceAccountName"] = service_account
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        spec["tolerations"] = list(tolerations)
    return spec
