"""Start the real node's programs in its sandbox: containerd (with our images), kubelet,
kube-proxy, and then cluster DNS (CoreDNS) and the GPU stand-in on the registered node."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Callable

from . import images as images_mod
from . import pki as pki_mod
from . import procs, realnode, toolchain

COREDNS = "coredns"


class RealNodeStarter:
    def __init__(self, directory: Path, net: realnode.NodeNet, init_pid: int, pki: pki_mod.Pki,
                 server: str, built: dict[str, images_mod.Image], logs: Path):
        self.dir, self.net, self.init_pid, self.pki = directory, net, init_pid, pki
        self.server, self.built, self.logs = server, built, logs
        self.sock = realnode.socket_path(directory)

    def _inside(self, name: str, cmd: list[str], env: dict | None = None) -> procs.Proc:
        return procs.start(name, realnode.node_command(self.init_pid, cmd),
                           self.logs / f"{name}.log", env=env)

    def start(self, track: Callable[[procs.Proc], procs.Proc], progress) -> None:
        t0 = time.monotonic()
        registry_proc, self.registry = images_mod.start_registry(self.net.host_ip, self.logs)
        track(registry_proc)
        progress(f"Started the image registry on {self.registry}")
        hosts = images_mod.write_registry_hosts(self.dir, self.registry)
        containerd_root = self.dir / "containerd" / "root"
        config = realnode.write_containerd_config(self.dir, containerd_root,
                                                  self.built["pause"].name, hosts)
        realnode.write_cni_config(self.dir, self.net)
        tmp = self.dir / "containerd" / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        containerd = track(self._inside("containerd", ["containerd", f"--config={config}"],
                                        env={**os.environ, "TMPDIR": str(tmp)}))
        realnode.wait_socket(self.sock, containerd)
        progress(f"Started containerd in {time.monotonic() - t0:.1f}s")

        load_images(self.dir, self.registry, list(self.built.values()), progress)

        kubelet_cert, kubelet_key = pki_mod.issue(
            self.pki, "kubelet", f"system:node:{realnode.NODE_NAME}", "system:nodes",
            server_ips=(self.net.node_ip,))
        kubeconfig = pki_mod.write_kubeconfig(self.dir / "kubelet.kubeconfig", self.server,
                                              self.pki, kubelet_cert, kubelet_key, "kubelet")
        kubelet_config = realnode.write_kubelet_config(self.dir, self.net, self.pki.dir,
                                                       self.sock)
        labels = ",".join(f"{k}={v}" for k, v in realnode.NODE_LABELS.items())
        self.kubelet_cmd = [
            str(toolchain.binary("kubelet")), f"--config={kubelet_config}",
            f"--kubeconfig={kubeconfig}", f"--hostname-override={realnode.NODE_NAME}",
            f"--node-ip={self.net.node_ip}", f"--node-labels={labels}",
            f"--register-with-taints={realnode.GPU_TAINT}", "--v=1"]
        track(self._inside("kubelet", self.kubelet_cmd))

        proxy_cert, proxy_key = pki_mod.issue(self.pki, "kube-proxy", "system:kube-proxy")
        proxy_kubeconfig = pki_mod.write_kubeconfig(self.dir / "kube-proxy.kubeconfig",
                                                    self.server, self.pki, proxy_cert, proxy_key,
                                                    "kube-proxy")
        proxy_config = realnode.write_kube_proxy_config(self.dir, self.net, proxy_kubeconfig)
        track(self._inside("kube-proxy", [str(toolchain.binary("kube-proxy")),
                                          f"--config={proxy_config}", "--v=1"]))
        progress(f"Started kubelet and kube-proxy (node {realnode.NODE_NAME})")

    def after_ready(self, api, progress) -> None:
        """The GPU stand-in and cluster DNS, once the node is registered and Ready."""
        advertise_gpus(api)
        deploy_coredns(api, self.built["coredns"].name)
        progress(f"Advertised {realnode.GPU_STAND_IN} (stand-in) and deployed CoreDNS")


def load_images(directory: Path, registry: str, images: list[images_mod.Image],
                progress) -> None:
    """Push images to the cluster's registry (layers it holds are skipped) and have the
    node's containerd pull them (layers it holds are skipped), so pods start at once."""
    t0 = time.monotonic()
    buildah = images_mod.Buildah()
    for image in images:
        images_mod.push(buildah, image, registry)
    t1 = time.monotonic()
    sock, hosts = realnode.socket_path(directory), images_mod.registry_hosts(directory)
    for image in images:
        try:
            pulled = realnode.ctr(sock, "images", "pull", f"--hosts-dir={hosts}", image.name,
                                  timeout=images_mod.PULL_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise realnode.RealNodeError(f"containerd did not pull {image.name} within "
                                         f"{images_mod.PULL_TIMEOUT}s") from None
        if pulled.returncode != 0:
            raise realnode.RealNodeError(f"containerd could not pull {image.name}: "
                                         f"{pulled.stderr.strip()[-1500:]}")
    progress(f"Loaded {len(images)} images: pushed in {t1 - t0:.1f}s, pulled by the node in "
             f"{time.monotonic() - t1:.1f}s")


def advertise_gpus(api) -> None:
    """The GPU STAND-IN: ``nvidia.com/gpu`` as an extended resource of the real node."""
    from kubernetes import client

    client.CoreV1Api(api).patch_node_status(realnode.NODE_NAME, {"status": {
        "capacity": realnode.GPU_STAND_IN, "allocatable": realnode.GPU_STAND_IN}})


COREFILE = """.:1053 {
    errors
    health :8080
    ready :8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }
    cache 5
    loop
    loadbalance
}
"""


def deploy_coredns(api, image: str) -> None:
    """CoreDNS in kube-system behind the ``kube-dns`` Service at 10.96.0.10 (no upstream: pods
    resolve cluster names only)."""
    from kubernetes import utils

    labels = {"k8s-app": "kube-dns"}
    objects = [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": COREDNS, "namespace": "kube-system"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "system:coredns"},
         "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods",
                                                       "namespaces"],
                    "verbs": ["list", "watch"]},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                    "verbs": ["list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "system:coredns"},
         "subjects": [{"kind": "ServiceAccount", "name": COREDNS, "namespace": "kube-system"}]},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": COREDNS, "namespace": "kube-system"},
         "data": {"Corefile": COREFILE}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": COREDNS, "namespace": "kube-system", "labels": labels},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
             "metadata": {"labels": labels},
             "spec": {
                 "serviceAccountName": COREDNS, "dnsPolicy": "Default",
                 "nodeSelector": {"kubetune.io/real-node": "true"},
                 "tolerations": [{"operator": "Exists"}],
                 "securityContext": {"runAsNonRoot": True, "runAsUser": 65532,
                                     "seccompProfile": {"type": "RuntimeDefault"}},
                 "containers": [{
                     "name": COREDNS, "image": image, "imagePullPolicy": "Never",
                     "args": ["-conf", "/etc/coredns/Corefile"],
                     "ports": [{"name": "dns", "containerPort": 1053, "protocol": "UDP"},
                               {"name": "dns-tcp", "containerPort": 1053, "protocol": "TCP"}],
                     "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181},
                                        "periodSeconds": 2},
                     "livenessProbe": {"httpGet": {"path": "/health", "port": 8080},
                                       "periodSeconds": 10},
                     "resources": {"requests": {"cpu": "10m", "memory": "32Mi"},
                                   "limits": {"memory": "128Mi"}},
                     "securityContext": {"allowPrivilegeEscalation": False,
                                         "readOnlyRootFilesystem": True,
                                         "capabilities": {"drop": ["ALL"]}},
                     "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns"}]}],
                 "volumes": [{"name": "config", "configMap": {"name": COREDNS}}]}}}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
         "spec": {"clusterIP": realnode.DNS_IP, "selector": labels, "ports": [
             {"name": "dns", "port": 53, "targetPort": 1053, "protocol": "UDP"},
             {"name": "dns-tcp", "port": 53, "targetPort": 1053, "protocol": "TCP"}]}},
    ]
    for obj in objects:
        utils.create_from_dict(api, obj)
