"""Who may write a FineTuneJob's status, as an admission policy: the operator, and each job's own
trainer (ServiceAccount `<job>-trainer`, patching its progress), nobody else in the namespace.

With this policy installed the operator does not need a Role and RoleBinding per job: one
RoleBinding per namespace (`kubetune-trainers`) binds the namespace's ServiceAccounts to the
ClusterRole below, and the ValidatingAdmissionPolicy narrows every status write by one of them
to its own job, by exact name. Without the policy (the operator checks at start-up) each job gets
its own Role that names it. Rendered into `crds/` and the chart by `kubetune.api.generate`."""

from __future__ import annotations

from .common import GROUP
from .finetunejob import FineTuneJobStatus

NAME = "kubetune-trainer-status"  # the ClusterRole, the policy and its binding
NAMESPACE_BINDING = "kubetune-trainers"  # the RoleBinding in each namespace with jobs
TRAINER_SUFFIX = "-trainer"

_SA_OF_NAMESPACE = "request.userInfo.username.startsWith('system:serviceaccount:' + " \
    "request.namespace + ':')"


def cluster_role() -> dict:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": NAME, "labels": {"app.kubernetes.io/part-of": "kubetune"}},
            "rules": [{"apiGroups": [GROUP], "resources": ["finetunejobs/status"],
                       "verbs": ["patch"]}]}


def policy(exempt_expression: str | None = None) -> dict:
    """`exempt_expression`: a CEL list of usernames the policy leaves alone (the operator's
    own ServiceAccount when it runs in a namespace that also has jobs)."""
    conditions = [{"name": "service-account-of-the-namespace", "expression": _SA_OF_NAMESPACE}]
    if exempt_expression:
        conditions.append({"name": "not-the-operator",
                           "expression": f"!(request.userInfo.username in {exempt_expression})"})
    return {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": NAME, "labels": {"app.kubernetes.io/part-of": "kubetune"}},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": [GROUP], "apiVersions": ["*"], "operations": ["UPDATE"],
                "resources": ["finetunejobs/status"]}]},
            "matchConditions": conditions,
            "validations": [{
                "expression": ("request.userInfo.username == 'system:serviceaccount:' + "
                               f"request.namespace + ':' + object.metadata.name + "
                               f"'{TRAINER_SUFFIX}'"),
                "messageExpression": ("request.userInfo.username + ' may not write the status "
                                      "of FineTuneJob ' + object.metadata.name + ': in its "
                                      "namespace only its own trainer (' + "
                                      f"object.metadata.name + '{TRAINER_SUFFIX}) may'"),
                "reason": "Forbidden"}, {
                "expression": _only_progress(),
                "messageExpression": ("request.userInfo.username + ' may change only "
                                      "status.progress of FineTuneJob ' + object.metadata.name"),
                "reason": "Forbidden"}],
        },
    }


def _only_progress() -> str:
    """CEL: every status field but progress is as it was (the operator's record of phase,
    conditions, attempts and artifact cannot be rewritten by the trainer)."""
    fields = [f.alias or name for name, f in FineTuneJobStatus.model_fields.items()
              if (f.alias or name) != "progress"]
    same = " && ".join(
        f"has(object.status.{f}) == has(oldObject.status.{f}) && "
        f"(!has(object.status.{f}) || object.status.{f} == oldObject.status.{f})"
        for f in fields)
    return f"!has(object.status) || (has(oldObject.status) && {same})"


def binding() -> dict:
    return {"apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": NAME, "labels": {"app.kubernetes.io/part-of": "kubetune"}},
            "spec": {"policyName": NAME, "validationActions": ["Deny"]}}


def namespace_binding(namespace: str) -> dict:
    """The one RoleBinding per namespace that the policy makes safe."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": NAMESPACE_BINDING, "namespace": namespace,
                         "labels": {"app.kubernetes.io/name": "kubetune",
                                    "app.kubernetes.io/managed-by": "kubetune"}},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": NAME},
            "subjects": [{"kind": "Group", "apiGroup": "rbac.authorization.k8s.io",
                          "name": f"system:serviceaccounts:{namespace}"}]}


def manifests(exempt_expression: str | None = None) -> list[dict]:
    return [cluster_role(), policy(exempt_expression), binding()]
