"""The process node agent (test stand-in for kubelet + container runtime) runs real processes
for pods bound to its node, and the real Job controller judges them by the status it writes."""

import os
import stat
import textwrap

import pytest
from kubernetes import client

from helpers import wait_for

pytestmark = pytest.mark.cluster

AGENT = {"nodeSelector": {"kubetune.io/process-agent": "true"},
         "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}


def _job(name: str, code: str, **pod_spec) -> dict:
    container = {"name": "main", "image": "python:3.11-slim", "command": ["python", "-c", code]}
    container.update(pod_spec.pop("container", {}))
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": 0, "template": {"spec": {
                "restartPolicy": "Never", **AGENT, "containers": [container], **pod_spec}}}}


def _condition(batch, name, namespace):
    job = batch.read_namespaced_job(name, namespace)
    return {c.type: c for c in job.status.conditions or [] if c.status == "True"}


def _pod_of(core, job, namespace):
    return core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items[0]


def test_job_controller_completes_and_fails_jobs_from_agent_statuses(cluster, namespace):
    batch, core = client.BatchV1Api(cluster.api), client.CoreV1Api(cluster.api)
    batch.create_namespaced_job(namespace, _job("exit-zero", "print('ok')"))
    batch.create_namespaced_job(namespace, _job("exit-three", "import sys; sys.exit(3)"))

    done = wait_for(lambda: _condition(batch, "exit-zero", namespace).get("Complete"),
                    message="Job exit-zero Complete")
    assert done.status == "True"
    failed = wait_for(lambda: _condition(batch, "exit-three", namespace).get("Failed"),
                      message="Job exit-three Failed")
    assert failed.reason == "BackoffLimitExceeded"

    ok_pod = _pod_of(core, "exit-zero", namespace)
    assert ok_pod.spec.node_name == "kubetune-agent-0"
    assert ok_pod.status.phase == "Succeeded"
    assert ok_pod.status.container_statuses[0].state.terminated.exit_code == 0
    bad_pod = _pod_of(core, "exit-three", namespace)
    assert bad_pod.status.phase == "Failed"
    assert bad_pod.status.container_statuses[0].state.terminated.exit_code == 3
    assert bad_pod.status.pod_ip.startswith("127.")


def test_agent_materialises_env_volumes_and_termination_message(cluster, namespace):
    batch, core = client.BatchV1Api(cluster.api), client.CoreV1Api(cluster.api)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "cfg"},
                                                  "data": {"config.yaml": "steps: 7\n"}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "creds"},
                                              "stringData": {"key": "s3cr3t"}})
    code = textwrap.dedent("""
        import os, pathlib
        cfg = pathlib.Path('/etc/kubetune/config.yaml').read_text().strip()
        token = pathlib.Path('/var/run/secrets/kubernetes.io/serviceaccount/token').read_text()
        msg = f"{cfg}|{os.environ['SECRET']}|{os.environ['POD_NS']}|{os.environ['GREETING']}|{len(token) > 100}"
        pathlib.Path('/dev/termination-log').write_text(msg)
    """)
    job = _job("materialise", code, container={
        "env": [{"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
                {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "NAME", "value": "agent"},
                {"name": "GREETING", "value": "hello-$(NAME)"}],
        "volumeMounts": [{"name": "cfg", "mountPath": "/etc/kubetune", "readOnly": True}]},
        volumes=[{"name": "cfg", "configMap": {"name": "cfg"}}])
    batch.create_namespaced_job(namespace, job)
    wait_for(lambda: _condition(batch, "materialise", namespace).get("Complete"),
             message="Job materialise Complete")
    term = _pod_of(core, "materialise", namespace).status.container_statuses[0].state.terminated
    assert term.message == f"steps: 7|s3cr3t|{namespace}|hello-agent|True"


def test_readiness_probe_and_graceful_delete(cluster, namespace):
    core = client.CoreV1Api(cluster.api)
    code = textwrap.dedent("""
        import http.server, os, signal, sys, pathlib
        def term(*_):
            pathlib.Path(os.environ['MARK']).write_text('got SIGTERM')
            sys.exit(0)
        signal.signal(signal.SIGTERM, term)
        srv = http.server.HTTPServer((os.environ['POD_IP'], 8080), http.server.SimpleHTTPRequestHandler)
        srv.serve_forever()
    """)
    mark = cluster.dir / f"{namespace}-sigterm"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"}, "spec": {
        **AGENT, "terminationGracePeriodSeconds": 10, "containers": [{
            "name": "web", "image": "python:3.11-slim", "command": ["python", "-c", code],
            "ports": [{"name": "http", "containerPort": 8080}],
            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "MARK", "value": str(mark)}],
            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}}]}}
    core.create_namespaced_pod(namespace, pod)

    def ready():
        status = core.read_namespaced_pod("web", namespace).status
        return any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])

    wait_for(ready, message="pod web Ready via its readiness probe")
    assert core.read_namespaced_pod("web", namespace).status.phase == "Running"

    core.delete_namespaced_pod("web", namespace)

    def gone():
        return not [p for p in core.list_namespaced_pod(namespace).items
                    if p.metadata.name == "web"]

    wait_for(gone, message="pod web deleted after graceful stop")
    assert mark.read_text() == "got SIGTERM"


def test_pod_mount_targets_never_touch_the_host(cluster, namespace):
    """Mount targets missing on the host (the service-account token folder, a ConfigMap file, a
    termination-message path) are made inside the pod's private mount namespace; an emptyDir at
    /tmp hides the host's /tmp. The host's paths are exactly as they were."""
    batch, core = client.BatchV1Api(cluster.api), client.CoreV1Api(cluster.api)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "cfg"},
                                                  "data": {"config.yaml": "steps: 9\n"}})
    config_dir = f"/etc/kubetune-{namespace}"
    term_path = f"/dev/kubetune-{namespace}.termination"
    tmp_file = f"/tmp/kubetune-{namespace}.written-by-pod"
    token_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
    host_paths = ["/run/secrets", "/var/run/secrets", token_dir, config_dir, term_path, tmp_file]
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
        pathlib.Path('{term_path}').write_text(f"{{cfg}}|{{len(token) > 100}}|{{only}}")
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
             message="Job host-untouched Complete")
    pod = _pod_of(core, "host-untouched", namespace)
    assert any(v.projected for v in pod.spec.volumes)  # the service-account token, projected
    term = pod.status.container_statuses[0].state.terminated
    assert term.message == f"steps: 9|True|['kubetune-{namespace}.written-by-pod']"

    assert {path: _host_state(path) for path in host_paths} == before
    assert {folder: set(os.listdir(folder)) for folder in listings} == listings


def _host_state(path: str):
    """What is at ``path`` on the host: nothing, or its kind and modification time."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return (stat.S_IFMT(info.st_mode), info.st_mtime_ns)
