"""What a user who may create FineTuneJobs and LoRAAdapters in a namespace can make the operator
do on their behalf, decided by the cluster admin in the operator's settings (chart: `policy.*`).
See docs/security.md.

* Trainer image: only the operator's trainer image, unless `allowedImages` lists a prefix that
  `spec.resources.image` starts with (a custom image runs with the job's S3 credentials).
* Trainer ServiceAccount: only the per-job account the operator creates, unless
  `allowedServiceAccounts` names the one in `spec.resources.serviceAccountName`.
* S3 endpoints: only the operator's default endpoint, unless `allowedS3Endpoints` lists the one
  a spec names (the operator itself calls that endpoint with the namespace's credentials: an
  open list would let a spec point it at any host it can reach). `*` allows any.
* Tracking servers: a spec's `tracking.mlflow.trackingUri` with a `credentialsSecret` must be on
  `allowedTrackingServers` (the trainer sends those credentials to that host in clear: an open
  list would let anyone who may create a job read any tracking Secret in the namespace). `*`
  allows any; a tracking URI without credentials is not restricted.
* Serving targets: a LoRAAdapter loads into (or, merged, rolls out) only a Deployment labelled
  `kubetune.io/adapter-target: "true"` by whoever owns it; `requireTargetOptIn: false` turns
  the check off.

A refused spec is reported by field: InvalidSpec on a FineTuneJob, PolicyDenied /
TargetNotOptedIn on a LoRAAdapter. Nothing is created or called for it."""

from __future__ import annotations

from .settings import OperatorSettings

TARGET_LABEL = "kubetune.io/adapter-target"


def endpoint_allowed(endpoint: str | None, settings: OperatorSettings) -> bool:
    if not endpoint:
        return True  # the operator's own default
    allowed = {e.rstrip("/") for e in settings.allowed_s3_endpoints}
    if settings.s3_endpoint:
        allowed.add(settings.s3_endpoint.rstrip("/"))
    return "*" in allowed or endpoint.rstrip("/") in allowed


def origin(url: str) -> str:
    """scheme://host[:port] of a URL, lower-cased, without a default port."""
    from urllib.parse import urlsplit

    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    port = parts.port if parts.port not in (None, {"http": 80, "https": 443}.get(scheme)) \
        else None
    return f"{scheme}://{(parts.hostname or '').lower()}" + (f":{port}" if port else "")


def tracking_allowed(mlflow, settings: OperatorSettings) -> bool:
    """Whether the trainer may send the tracking Secret's credentials to the spec's server."""
    if mlflow is None or mlflow.credentials_secret is None:
        return True
    allowed = set(settings.allowed_tracking_servers)
    try:
        return "*" in allowed or origin(mlflow.tracking_uri) in {origin(a) for a in allowed}
    except ValueError:  # a port that is not a number
        return False


def finetunejob_errors(job, settings: OperatorSettings, trusted: dict | None = None
                       ) -> list[str]:
    """Policy refusals of a parsed FineTuneJob, each naming its field. `trusted`: the spec
    values a ClusterFineTuneRuntime gave it (the cluster admin's own, allowed as they are)."""
    errors = []
    res = job.spec.resources
    trusted = trusted or {}
    given = trusted.get("resources") or {}
    if res.image and res.image != settings.trainer_image and res.image != given.get("image") \
            and not any(
            res.image.startswith(prefix) for prefix in settings.allowed_images):
        listed = "".join(f", {prefix}*" for prefix in settings.allowed_images)
        errors.append(f"spec.resources.image: {res.image} is not allowed by the operator's "
                      f"policy (allowed: the default trainer image{listed}; chart value "
                      f"policy.allowedImages)")
    if res.service_account_name and res.service_account_name != \
            given.get("serviceAccountName") and \
            res.service_account_name not in settings.allowed_service_accounts:
        errors.append(f"spec.resources.serviceAccountName: {res.service_account_name} is not "
                      f"allowed by the operator's policy (chart value "
                      f"policy.allowedServiceAccounts)")
    if job.spec.output.endpoint != (trusted.get("output") or {}).get("endpoint") and \
            not endpoint_allowed(job.spec.output.endpoint, settings):
        errors.append(f"spec.output.endpoint: {job.spec.output.endpoint} is not allowed by the "
                      f"operator's policy (chart value policy.allowedS3Endpoints)")
    mlflow = job.spec.tracking.mlflow if job.spec.tracking else None
    if not tracking_allowed(mlflow, settings):
        errors.append(f"spec.tracking.mlflow.trackingUri: {origin(mlflow.tracking_uri)} may not "
                      f"receive the credentials of spec.tracking.mlflow.credentialsSecret by the "
                      f"operator's policy (chart value policy.allowedTrackingServers)")
    return errors


def target_opted_in(deployment: dict, settings: OperatorSettings) -> bool:
    if not settings.require_target_opt_in:
        return True
    labels = (deployment.get("metadata") or {}).get("labels") or {}
    return labels.get(TARGET_LABEL) == "true"


def not_opted_in_message(name: str, ns: str) -> str:
    return (f"deployment {name} in {ns} has not opted in to adapters: label it "
            f'{TARGET_LABEL}: "true" (the operator changes only Deployments that opted in)')
