"""The real node (kubelet + containerd + runc, our images): the Job controller judges real
containers, pods run as non-root on read-only roots in restricted namespaces, reach the
apiserver through the `kubernetes` Service and each other through cluster DNS, and nothing a
pod mounts or writes lands on this machine's own /var, /run, /etc or /dev."""

import os
import stat
import textwrap

import pytest
from kubernetes import client

from helpers import wait_for

pytestmark = pytest.mark.cluster

REAL = {"nodeSelector": {"kubetune.io/real-node": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65532,
                            "seccompProfile": {"type": "RuntimeDefault"}}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}


def _image() -> str:
    return os.environ["KUBETUNE_OPERATOR_IMAGE"]  # the smallest of ours with Python


def _job(name: str, code: str, **pod_spec) -> dict:
    container = {"name": "main", "image": _image(), "command": ["python", "-c", code],
                 "securityContext": CONTAINER_SECURITY}
    container.update(pod_spec.pop("container", {}))
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": 0, "template": {"spec": {
                "restartPolicy": "Never", **REAL, "containers": [container], **pod_spec}}}}


def _condition(batch, name, namespace):
    job = batch.read_namespaced_job(name, namespace)
    return {c.type: c for c in job.status.conditions or [] if c.status == "True"}


def _pod_of(core, job, namespace):
    return core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items[0]


def test_job_controller_judges_real_containers(cluster, namespace):
    batch, core = client.BatchV1Api(cluster.api), client.CoreV1Api(cluster.api)
    batch.create_namespaced_job(namespace, _job("exit-zero", "import os; print(os.getuid())"))
    batch.create_namespaced_job(namespace, _job("exit-three", "import sys; sys.exit(3)"))

    done = wait_for(lambda: _condition(batch, "exit-zero", namespace).get("Complete"),
                    timeout=90, message="Job exit-zero Complete")
    assert done.status == "True"
    failed = wait_for(lambda: _condition(batch, "exit-three", namespace).get("Failed"),
                      timeout=90, message="Job exit-three Failed")
    assert failed.reason == "BackoffLimitExceeded"

    ok_pod = _pod_of(core, "exit-zero", namespace)
    assert ok_pod.spec.node_name == "real-0"
    assert ok_pod.status.container_statuses[0].state.terminated.exit_code == 0
    assert ok_pod.status.container_statuses[0].container_id.startswith("containerd://")
    logs = core.read_namespaced_pod_log(ok_pod.metadata.name, namespace)
    assert logs.strip() == "65532"  # the image's user, through kubectl logs
    bad_pod = _pod_of(core, "exit-three", namespace)
    assert bad_pod.status.container_statuses[0].state.terminated.exit_code == 3
    assert bad_pod.status.pod_ip.startswith("10.246.")


def test_pod_mounts_and_writes_never_touch_the_host(cluster, namespace):
    """A projected service-account token, a ConfigMap file, an emptyDir over /tmp and a
    termination-message path: the pod sees them all, and the host paths are unchanged."""
    batch, core = client.BatchV1Api(cluster.api), client.CoreV1Api(cluster.api)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "cfg"},
                                                  "data": {"config.yaml": "steps: 9\n"}})
    config_dir = f"/etc/kubetune-{namespace}"
    term_path = f"/dev/kubetune-{namespace}.termination"
    tmp_file = f"/tmp/kubetune-{namespace}.written-by-pod"
    token_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
    host_paths = ["/run/secrets", "/var/run/secrets", token_dir, config_dir, term_path, tmp_file,
                  "/var/lib/kubelet", "/var/log/pods", "/var/log/containers", "/etc/cni",
                  "/var/lib/cni", "/run/containerd", "/var/run/netns"]
    for unique in (config_dir, term_path, tmp_file):
        assert not os.path.lexists(unique), unique
    before = {path: _host_state(path) for path in host_paths}
    listings = {folder: set(os.listdir(folder)) for folder in ("/run", "/etc", "/dev")}

    code = textwrap.dedent(f"""
        import os, pathlib
        token = pathlib.Path('{token_dir}/token').read_text()
        cfg = pathlib.Path('{config_dir}/config.yaml').read_text().strip()
        pathlib.Path('{tmp_file}').write_text('pod')
        only = sorted(os.listdir('/tmp'))
        try:
            pathlib.Path('/etc/written').write_text('x')
            root = 'writable'
        except OSError:
            root = 'read-only'
        pathlib.Path('{term_path}').write_text(f"{{cfg}}|{{len(token) > 100}}|{{only}}|{{root}}")
    """)
    job = _job("host-untouched", code, container={
        "terminationMessagePath": term_path,
        "volumeMounts": [{"name": "cfg", "mountPath": f"{config_dir}/config.yaml",
                          "subPath": "config.yaml", "readOnly": True},
                         {"name": "scratch", "mountPath": "/tmp"}]},
        volumes=[{"name": "cfg", "configMap": {"name": "cfg"}},
                 {"name": "scratch", "emptyDir": {}}])
    batch.create_namespaced_job(namespace, job)
    wait_for(lambda: _condition(batch, "host-untouched", namespace).get("Complete"),
             timeout=90, message="Job host-untouched Complete")
    pod = _pod_of(core, "host-untouched", namespace)
    assert any(v.projected for v in pod.spec.volumes)  # the service-account token, projected
    term = pod.status.container_statuses[0].state.terminated
    assert term.message == f"steps: 9|True|['kubetune-{namespace}.written-by-pod']|read-only"

    assert {path: _host_state(path) for path in host_paths} == before
    assert {folder: set(os.listdir(folder)) for folder in listings} == listings


def test_in_cluster_api_and_dns_with_a_headless_service(cluster, namespace):
    """Pods reach the apiserver with in-cluster config (the `kubernetes` Service, kube-proxy)
    and find each other by name through CoreDNS: `<pod>.<headless service>` resolves, as
    torchrun's rendezvous of a multi-node FineTuneJob needs."""
    batch, core = client.BatchV1Api(cluster.api), client.CoreV1Api(cluster.api)
    core.create_namespaced_service(namespace, {
        "metadata": {"name": "rdzv"},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": {"app": "peer"}, "ports": [{"port": 29500}]}})
    peer = {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "peer-0", "labels": {"app": "peer"}},
            "spec": {**REAL, "hostname": "peer-0", "subdomain": "rdzv", "containers": [{
                "name": "main", "image": _image(), "securityContext": CONTAINER_SECURITY,
                "command": ["python", "-c", "import time; time.sleep(600)"]}],
                "terminationGracePeriodSeconds": 1}}
    core.create_namespaced_pod(namespace, peer)
    code = textwrap.dedent(f"""
        import socket, time, pathlib
        from kubernetes import client, config
        config.load_incluster_config()  # the `kubernetes` Service, the pod's token and CA
        version = client.VersionApi().get_code().git_version
        for _ in range(60):
            try:
                peer = socket.gethostbyname('peer-0.rdzv.{namespace}.svc.cluster.local')
                break
            except OSError:
                time.sleep(1)
        api = socket.gethostbyname('kubernetes.default')
        pathlib.Path('/dev/termination-log').write_text(f"{{version}}|{{peer}}|{{api}}")
    """)
    batch.create_namespaced_job(namespace, _job("resolver", code))
    wait_for(lambda: _condition(batch, "resolver", namespace).get("Complete"), timeout=120,
             message="Job resolver Complete")
    peer_ip = core.read_namespaced_pod("peer-0", namespace).status.pod_ip
    term = _pod_of(core, "resolver", namespace).status.container_statuses[0].state.terminated
    assert term.message == f"v1.35.4|{peer_ip}|10.96.0.1", term.message


def _host_state(path: str):
    """What is at ``path`` on the host: nothing, or its kind and modification time."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return (stat.S_IFMT(info.st_mode), info.st_mtime_ns)
