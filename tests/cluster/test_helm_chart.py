"""The Helm chart against the real control plane: lint, schema, server-side validation of the
rendered manifests, and `helm install` as a user runs it: the operator as a pod from the
`operator` image (built from our Dockerfile) on the real node, with the chart's ServiceAccount,
through the whole FineTuneJob → LoRAAdapter → hot-swap flow (trainer and `kubetune serve` pods
from their images, in a restricted namespace); `kubectl auth can-i` limits of that identity,
upgrade, uninstall."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from helpers import PodLogs, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from servingutil import (REAL_NODE, complete, create_deployment, models,  # noqa: E402
                         serve_deployment, wait_condition, wait_ready)

pytestmark = [pytest.mark.cluster]
ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"
KUBE_VERSION = "1.35.4"


def helm(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["helm", *args], capture_output=True, text=True, timeout=400,
                          env={**os.environ, **cluster.env})
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_lint_and_schema_rejects_unknown_keys(cluster):
    out = helm(cluster, "lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION)
    assert "0 chart(s) failed" in out.stdout
    bad = helm(cluster, "template", "x", str(CHART), "--kube-version", KUBE_VERSION,
               "--set", "operator.replicaz=2", check=False)
    assert bad.returncode != 0 and "replicaz" in bad.stderr
    bad = helm(cluster, "template", "x", str(CHART), "--kube-version", KUBE_VERSION,
               "--set", "operator.watchNamespaces[0]=Not_A_Namespace", check=False)
    assert bad.returncode != 0 and "watchNamespaces" in bad.stderr


@pytest.mark.parametrize("values", [
    [],
    ["--set", "operator.watchNamespaces={NS}", "--set", "operator.standby=true",
     "--set", "metrics.service.enabled=false"],
    ["--set", "crds.enabled=false", "--set", "operator.standby=true",
     "--set", "s3.endpoint=http://s3.example:9000", "--set", "s3.credentialsSecret=s3"],
    ["--set", "api.enabled=true", "--set", "api.storage=s3://kubetune/api",
     "--set", "api.models.tiny-llama=builtin://tiny-llama", "--set", "api.keyNamespace=@NS",
     "--set", "api.serveDeployment=chat", "--set", "api.s3CredentialsSecret=s3"],
], ids=["defaults", "namespaced-standby", "no-crds", "openai-api"])
def test_rendered_manifests_validate_on_the_real_apiserver(cluster, crds, values):
    ns = f"kt-tpl-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", ns)
    values = [v.replace("{NS}", "{" + ns + "}").replace("@NS", ns) for v in values]
    rendered = helm(cluster, "template", "kt", str(CHART), "--namespace", ns,
                    "--kube-version", KUBE_VERSION, *values).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    # CRDs first, then the rest: server-side dry run.
    crd_docs = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    rest = [d for d in docs if d not in crd_docs]
    if crd_docs:
        out = cluster.kubectl("apply", "--dry-run=server", "-f", "-",
                              input=yaml.safe_dump_all(crd_docs))
        assert out.stdout.count("(server dry run)") == len(crd_docs)
    out = cluster.kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-",
                          input=yaml.safe_dump_all(rest))
    assert out.stdout.count("(server dry run)") == len(rest), out.stdout
    deployment = next(d for d in docs if d["kind"] == "Deployment" and d["spec"]["selector"][
        "matchLabels"].get("app.kubernetes.io/component") == "operator")
    pod = deployment["spec"]["template"]["spec"]
    ctr = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
    assert ctr["securityContext"]["capabilities"]["drop"] == ["ALL"]
    kinds = {d["kind"] for d in docs}
    if "operator.watchNamespaces" in " ".join(values):
        # no cluster-wide access for the operator; the one ClusterRole is the trainers' (bound
        # per namespace, narrowed by the trainer-status policy)
        assert "ClusterRoleBinding" not in kinds and "Role" in kinds
        assert [d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRole"] == [
            "kubetune-trainer-status"]
        assert deployment["spec"]["replicas"] == 2 and "Service" not in kinds
        assert f"--namespace={ns}" in ctr["args"] and "--leader-elect" in ctr["args"]
        lease_role = next(d for d in docs if d["kind"] == "Role" and
                          d["metadata"]["name"].endswith("-leader"))
        assert lease_role["metadata"]["namespace"] == ns  # the release namespace only
        assert {r["resources"][0] for r in lease_role["rules"]} == {"leases"}
    else:
        assert "ClusterRole" in kinds and deployment["spec"]["strategy"]["type"] in (
            "Recreate", "RollingUpdate")
    if "crds.enabled=false" in values:
        assert not crd_docs
    api = [d for d in docs if d["kind"] == "Deployment" and
           d["metadata"]["name"].endswith("-api")]
    assert len(api) == ("api.enabled=true" in values)
    if api:  # its own pods, account and key Role in the key namespace; the operator's untouched
        spec = api[0]["spec"]
        assert spec["selector"]["matchLabels"]["app.kubernetes.io/component"] == "api"
        args = spec["template"]["spec"]["containers"][0]["args"]
        assert "--model=tiny-llama=builtin://tiny-llama" in args and "--runtime=default" in args
        keys = next(d for d in docs if d["kind"] == "Role" and
                    d["metadata"]["name"].endswith("-api-keys"))
        assert keys["metadata"]["namespace"] == ns and keys["rules"][0]["verbs"] == ["list"]
    cluster.kubectl("delete", "namespace", ns, "--wait=false")


def _token_kubeconfig(cluster, ns: str, account: str, path: Path) -> Path:
    token = client.CoreV1Api(cluster.api).create_namespaced_service_account_token(
        account, ns, {"spec": {"expirationSeconds": 3600}}).status.token
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    server = admin["clusters"][0]["cluster"]
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": server}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": account}}],
        "current-context": "sa"}))
    return path


def _adopt_crds(cluster, release: str, ns: str) -> None:
    """The session's CRDs and admission policies (everything in crds/) were applied with
    kubectl; let the release adopt them."""
    applied = [d for path in sorted((ROOT / "crds").glob("*.yaml"))
               for d in yaml.safe_load_all(path.read_text()) if d]
    for kind, name in ((d["kind"].lower(), d["metadata"]["name"]) for d in applied):
        cluster.kubectl("annotate", "--overwrite", kind, name,
                        f"meta.helm.sh/release-name={release}",
                        f"meta.helm.sh/release-namespace={ns}")
        cluster.kubectl("label", "--overwrite", kind, name, "app.kubernetes.io/managed-by=Helm")


def test_install_rbac_is_sufficient_and_minimal_upgrade_uninstall(cluster, crds, s3_server,
                                                                  tmp_path):
    suffix = secrets.token_hex(3)
    system, team, other = f"kt-sys-{suffix}", f"kt-team-{suffix}", f"kt-other-{suffix}"
    for ns in (system, team, other):
        cluster.kubectl("create", "namespace", ns)
        cluster.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
    core = client.CoreV1Api(cluster.api)
    wait_for(lambda: core.read_namespaced_service_account("default", team), timeout=30)
    for ns in (team, other):
        core.create_namespaced_secret(ns, {"metadata": {"name": "s3-creds"}, "stringData": {
            "AWS_ACCESS_KEY_ID": s3_server.access_key,
            "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}})
    _adopt_crds(cluster, "kt", system)
    operator_image, trainer_image = (cluster.env[f"KUBETUNE_{t}_IMAGE"]
                                     for t in ("OPERATOR", "TRAINER"))
    op = PodLogs(cluster, system, "app.kubernetes.io/name=kubetune")
    install = helm(
        cluster, "install", "kt", str(CHART), "--namespace", system,
        "--set", f"operator.watchNamespaces={{{team}}}",
        "--set", f"operator.image.repository={operator_image.rsplit(':', 1)[0]}",
        "--set", f"operator.image.tag={operator_image.rsplit(':', 1)[1]}",
        "--set", f"trainer.image.repository={trainer_image.rsplit(':', 1)[0]}",
        "--set", f"trainer.image.tag={trainer_image.rsplit(':', 1)[1]}",
        "--set-json", f'operator.nodeSelector={json.dumps(REAL_NODE)}',
        "--set-json", 'operator.tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}]',
        "--set-json", f'gpu.mergeNodeSelector={json.dumps(REAL_NODE)}',
        "--set", "operator.adapterResyncSeconds=2",
        "--set", f"s3.endpoint={s3_server.endpoint}",
        "--set", "s3.credentialsSecret=s3-creds", "--wait", "--timeout", "300s",
        check=False)
    assert install.returncode == 0, f"{install.stderr}\noperator pod log:\n{op.tail()}"
    assert "kubectl -n <ns> get finetunejobs -w" in install.stdout  # NOTES tell what's next
    pod = op.pod()
    assert pod.spec.node_name == "real-0" and pod.status.phase == "Running"
    assert pod.spec.containers[0].image == operator_image
    account = "kt-kubetune"
    kubeconfig = _token_kubeconfig(cluster, system, account, tmp_path / "sa.kubeconfig")

    def can(*args: str) -> bool:
        out = cluster.kubectl("--kubeconfig", str(kubeconfig), "auth", "can-i", *args,
                              check=False)
        return out.stdout.strip() == "yes"

    assert can("create", "finetunejobs.kubetune.io", "-n", team)
    assert can("patch", "loraadapters.kubetune.io/status", "-n", team)
    assert can("get", "secrets", "-n", team)
    assert can("create", "jobs.batch", "-n", team)
    assert can("patch", "deployments.apps", "-n", team)
    assert not can("get", "secrets", "-n", other)
    assert not can("list", "secrets", "--all-namespaces")
    assert not can("list", "secrets", "-n", team)  # reads the named Secret, never lists
    assert not can("create", "jobs.batch", "-n", other)
    assert not can("get", "finetunejobs.kubetune.io", "-n", other)
    assert not can("delete", "pods", "-n", team)
    assert not can("create", "deployments.apps", "-n", team)
    assert not can("list", "nodes")
    assert not can("create", "clusterroles.rbac.authorization.k8s.io")
    assert not can("update", "roles.rbac.authorization.k8s.io", "-n", team)
    assert not can("create", "customresourcedefinitions.apiextensions.k8s.io")

    # The operator pod, with exactly that identity, runs the whole flow in the team namespace.
    create_deployment(cluster, team, serve_deployment("srv", 1, endpoint=s3_server.endpoint))
    pod = wait_ready(cluster, team, "srv", 1)[0]
    base = complete(pod["ip"], "base")
    job = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "rbac"},
           "spec": {"baseModel": {"uri": "builtin://tiny-llama", "revision": "v1"},
                    "dataset": {"train": {"uri": "builtin://tiny-chat"},
                                "format": "messages", "maxLength": 128},
                    "method": {"type": "LoRA", "lora": {"r": 8}},
                    "training": {"maxSteps": 30, "learningRate": 0.01,
                                 "perDeviceBatchSize": 8, "loggingSteps": 5},
                    "resources": {"gpusPerNode": 1, "nodeSelector": REAL_NODE},
                    "output": {"uri": f"s3://{s3_server.bucket}/helm/{suffix}",
                               "createAdapter": {"servingName": "rbac",
                                                 "target": {"deployment": "srv"}}}}}
    cluster.kubectl("apply", "-n", team, "-f", "-", input=yaml.safe_dump(job))
    ready = wait_condition(cluster, team, "rbac", "Ready", timeout=300, op=op)
    assert ready["status"]["loadedReplicas"] == "1/1"
    assert "rbac" in models(pod["ip"]) and complete(pod["ip"], "rbac") != base
    ftj = cluster.kubectl("get", "finetunejob", "rbac", "-n", team, "-o", "yaml").stdout
    assert yaml.safe_load(ftj)["status"]["progress"]["step"] == 30  # trainer's own Role
    log = op.tail(100000)
    assert "Created Job" in log  # the operator pod's own log, through the kubelet
    # Every 403 from the apiserver says "forbidden" ("... is forbidden: User ... cannot");
    # a bare "403" also matches timestamps and byte counts in the access log.
    assert "forbidden" not in log.lower(), log[-3000:]

    # Upgrade to changed values: namespaced → also watch `other`; metrics Service off.
    helm(cluster, "upgrade", "kt", str(CHART), "--namespace", system, "--reuse-values",
         "--set", f"operator.watchNamespaces={{{team},{other}}}",
         "--set", "metrics.service.enabled=false", "--set", "operator.adapterResyncSeconds=10")
    assert can("get", "secrets", "-n", other)
    services = core.list_namespaced_service(system).items
    assert not [s for s in services if s.metadata.name == "kt-kubetune-metrics"]
    dep = client.AppsV1Api(cluster.api).read_namespaced_deployment("kt-kubetune", system)
    env = {e.name: e.value for e in dep.spec.template.spec.containers[0].env}
    assert env["KUBETUNE_ADAPTER_RESYNC_SECONDS"] == "10"
    assert f"--namespace={other}" in dep.spec.template.spec.containers[0].args

    # Uninstall: the chart's objects go; the CRDs and users' objects stay (crds.keep).
    helm(cluster, "uninstall", "kt", "--namespace", system, "--wait")
    assert not can("get", "secrets", "-n", team)
    ext = client.ApiextensionsV1Api(cluster.api)
    for crd in ("finetunejobs.kubetune.io", "loraadapters.kubetune.io"):
        assert ext.read_custom_resource_definition(crd).metadata.name == crd
    # the trainer-status policy stays with them (namespaces keep their trainer RoleBindings)
    assert cluster.kubectl("get", "validatingadmissionpolicy", "kubetune-trainer-status"
                           ).returncode == 0
    assert cluster.kubectl("get", "finetunejob", "rbac", "-n", team).returncode == 0
    assert cluster.kubectl("get", "loraadapter", "rbac", "-n", team).returncode == 0
    # Objects with our finalizer must not block namespace deletion without an operator.
    cluster.kubectl("patch", "loraadapter", "rbac", "-n", team, "--type=merge", "-p",
                    '{"metadata":{"finalizers":null}}')
    for ns in (system, team, other):
        cluster.kubectl("delete", "namespace", ns, "--wait=false")
