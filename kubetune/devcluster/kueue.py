"""Kueue in the dev cluster: the real controller (built from its Go module), its CRDs and its
admission webhooks, on loopback beside the apiserver.

Kueue runs as a process on this machine with the cluster's admin identity, as the other
control-plane parts do. Its webhooks are served on 127.0.0.1 with a certificate of the
cluster's CA (Kueue's own certificate manager wants a Service in front of a pod; the apiserver
reaches a loopback URL directly), and only the webhooks of what it manages here are
registered: batch Jobs and Kueue's own kinds (a registered webhook whose server path is not
served would refuse every object it matches).

What Kueue offers by default (`default_queues`): a ResourceFlavor, a ClusterQueue with the
real node's GPU stand-ins, CPU and memory, and a LocalQueue `gpus` in `default`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from . import pki as pki_mod
from . import procs, toolchain

API_GROUP = "kueue.x-k8s.io"
API_VERSION = "v1beta2"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
NAMESPACE = "kueue-system"
MUTATING = "kueue-mutating-webhook-configuration"
VALIDATING = "kueue-validating-webhook-configuration"
# The webhooks this deployment serves: batch Jobs (the only integration enabled) and Kueue's
# own kinds. The rest of upstream's list (Pods, Deployments, JobSets, Ray, ...) is left out.
SERVED_PATHS = ("-batch-v1-job", "-kueue-x-k8s-io-")
METRICS_CERTS = "/etc/kueue/metrics/certs"  # fixed in Kueue's main.go


class KueueError(RuntimeError):
    """Kueue did not start; the message says why and where its log is."""


def manifests_dir() -> Path:
    """CRDs and webhook manifests, copied from Kueue's module beside its binary."""
    return toolchain.tool("kueue").path.parent / "manifests"


def config(webhook_port: int, health_port: int, cert_dir: Path) -> dict:
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "clientConnection": {"qps": 50, "burst": 100},
        "integrations": {"frameworks": ["batch/job"]},
    }


def webhook_configurations(upstream: list[dict], port: int, ca_pem: bytes) -> list[dict]:
    """Upstream's webhook configurations, pointed at the loopback server, with only the
    webhooks served here."""
    import base64

    bundle = base64.b64encode(ca_pem).decode()
    out = []
    for doc in upstream:
        if not doc or doc.get("kind") not in ("MutatingWebhookConfiguration",
                                              "ValidatingWebhookConfiguration"):
            continue
        hooks = []
        for hook in doc.get("webhooks") or []:
            path = hook["clientConfig"]["service"]["path"]
            if not any(p in path for p in SERVED_PATHS):
                continue
            hook = {**hook, "clientConfig": {"url": f"https://127.0.0.1:{port}{path}",
                                             "caBundle": bundle}}
            hooks.append(hook)
        name = MUTATING if doc["kind"].startswith("Mutating") else VALIDATING
        out.append({"apiVersion": doc["apiVersion"], "kind": doc["kind"],
                    "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "kueue"}},
                    "webhooks": hooks})
    return out


def default_queues(gpus: int = 8, cpu: str = "64", memory: str = "256Gi",
                   namespace: str = "default") -> list[dict]:
    """A ResourceFlavor, a ClusterQueue offering GPUs (lower priorities preempted within it)
    and a LocalQueue `gpus` that points at it."""
    return [
        {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "ResourceFlavor",
         "metadata": {"name": "default-flavor"}},
        cluster_queue("kubetune-gpus", gpus, cpu, memory),
        local_queue("gpus", namespace, "kubetune-gpus"),
    ]


def cluster_queue(name: str, gpus: int, cpu: str, memory: str,
                  flavor: str = "default-flavor") -> dict:
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "ClusterQueue",
            "metadata": {"name": name},
            "spec": {"namespaceSelector": {},
                     "preemption": {"withinClusterQueue": "LowerPriority"},
                     "resourceGroups": [{
                         "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                         "flavors": [{"name": flavor, "resources": [
                             {"name": "cpu", "nominalQuota": cpu},
                             {"name": "memory", "nominalQuota": memory},
                             {"name": "nvidia.com/gpu", "nominalQuota": gpus}]}]}]}}


def local_queue(name: str, namespace: str, cluster_queue_name: str) -> dict:
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "LocalQueue",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterQueue": cluster_queue_name}}


class Kueue:
    """Start and stop Kueue on a running dev cluster (state kept by the caller)."""

    def __init__(self, directory: Path, kubeconfig: Path, kubectl: Path, pki: pki_mod.Pki):
        self.dir = directory
        self.kubeconfig = kubeconfig
        self.kubectl = kubectl
        self.pki = pki

    def _kubectl(self, *args: str, input: str | None = None) -> str:
        done = subprocess.run([str(self.kubectl), f"--kubeconfig={self.kubeconfig}", *args],
                              input=input, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise KueueError(f"kubectl {' '.join(args[:2])}: {done.stderr.strip()[-2000:]}")
        return done.stdout

    def start(self, logs: Path, progress, timeout: float = 120) -> procs.Proc:
        binary = toolchain.binary("kueue")
        manifests = manifests_dir()
        t0 = time.monotonic()
        # CRDs first: Kueue's informers start on them. Server-side: the Workload CRD is larger
        # than the annotation a client-side apply keeps.
        self._kubectl("apply", "--server-side", "--force-conflicts", "-f",
                      str(manifests / "crds"))
        self._kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f",
                      str(manifests / "crds"))
        self._kubectl("apply", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}))
        cert_dir = self.dir / "kueue" / "certs"
        cert_dir.mkdir(parents=True, exist_ok=True)
        crt, key = pki_mod.issue(self.pki, "kueue-webhook", "kueue-webhook",
                                 server_ips=("127.0.0.1",), client=False)
        shutil.copyfile(crt, cert_dir / "tls.crt")
        shutil.copyfile(key, cert_dir / "tls.key")
        # Without Kueue's own certificate manager it reads its metrics certificate from a
        # fixed path, /etc/kueue/metrics/certs: bound there in a private mount namespace, so
        # nothing is written under the host's /etc.
        scratch = self.dir / "kueue" / "mounts"
        scratch.mkdir(parents=True, exist_ok=True)
        webhook_port, health_port = procs.free_ports(2)
        cfg = self.dir / "kueue" / "config.yaml"
        cfg.write_text(yaml.safe_dump(config(webhook_port, health_port, cert_dir)))
        env = {"KUBECONFIG": str(self.kubeconfig), "PATH": "/usr/bin:/bin"}
        proc = procs.start("kueue", [
            sys.executable, "-m", "kubetune.devcluster.privatemounts", "--scratch", str(scratch),
            "--bind", f"{cert_dir}:{METRICS_CERTS}", "--",
            str(binary), f"--config={cfg}", "--feature-gates=VisibilityOnDemand=false",
            "--zap-log-level=info"], logs / "kueue.log", env=env)
        try:
            procs.wait_ready(proc, f"http://127.0.0.1:{health_port}/readyz", timeout,
                             KueueError)
            upstream = list(yaml.safe_load_all((manifests / "webhooks.yaml").read_text()))
            for obj in webhook_configurations(upstream, webhook_port,
                                              self.pki.ca_cert.read_bytes()):
                self._kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                              input=json.dumps(obj))
        except BaseException:
            procs.stop(proc)
            raise
        progress(f"Started Kueue {toolchain.KUEUE_VERSION} (webhooks on 127.0.0.1:"
                 f"{webhook_port}) in {time.monotonic() - t0:.1f}s")
        return proc

    def apply(self, objs: list[dict]) -> None:
        self._kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                      input="\n---\n".join(json.dumps(o) for o in objs))

    def remove_webhooks(self) -> None:
        """Before Kueue stops: a webhook whose server is gone refuses every Job."""
        self._kubectl("delete", f"mutatingwebhookconfiguration/{MUTATING}",
                      f"validatingwebhookconfiguration/{VALIDATING}", "--ignore-not-found")
