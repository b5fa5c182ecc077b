"""The dev cluster: a real control plane (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler) on loopback, KWOK-simulated GPU and CPU nodes, one process-node-agent node that
really runs pods, and SeaweedFS S3. Everything it starts is recorded by PID in ``state.json`` of
its folder, and ``down`` stops exactly those processes."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import images as images_mod
from . import pki as pki_mod
from . import procs, realnode, s3, toolchain
from .nodestart import RealNodeStarter

GPU_RESOURCE = "nvidia.com/gpu"
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
ADDONS = ("kueue", "flux", "mlflow")  # `dev-cluster up --with NAME`
# Go-built tools per add-on; mlflow is a Python server in its own cached environment
# (devcluster/mlflow.py), installed by `dev-cluster build --with mlflow`.
ADDON_TOOLS = {"kueue": ("kueue",), "flux": ("source-controller", "kustomize-controller"),
               "mlflow": ()}


def default_dir() -> Path:
    base = os.environ.get("KUBETUNE_DEV_CLUSTER_DIR")
    if base:
        return Path(base)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "kubetune" / "dev-cluster"


@dataclass
class NodeSpec:
    name: str
    gpus: int
    labels: dict[str, str]
    taints: list[dict]
    cpu: str = "32"
    memory: str = "256Gi"


def kwok_nodes() -> list[NodeSpec]:
    gpu_labels = {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                  "nvidia.com/gpu.count": "8", "node.kubernetes.io/instance-type": "p5.48xlarge",
                  "kubetune.io/pool": "gpu"}
    nodes = [NodeSpec(f"kwok-gpu-{i}", 8, gpu_labels, [GPU_TAINT], cpu="192", memory="2048Gi")
             for i in range(2)]
    nodes.append(NodeSpec("kwok-cpu-0", 0, {"node.kubernetes.io/instance-type": "m7i.8xlarge",
                                            "kubetune.io/pool": "cpu"}, [], cpu="32", memory="128Gi"))
    return nodes


def node_manifest(spec: NodeSpec) -> dict:
    capacity = {"cpu": spec.cpu, "memory": spec.memory, "pods": "110"}
    if spec.gpus:
        capacity[GPU_RESOURCE] = str(spec.gpus)
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": spec.name, "annotations": {KWOK_ANNOTATION: "fake"},
                     "labels": {"kubernetes.io/hostname": spec.name, "kubernetes.io/os": "linux",
                                "kubernetes.io/arch": "amd64", "type": "kwok", **spec.labels}},
        "spec": {"taints": spec.taints} if spec.taints else {},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def kwok_finetunejob(name: str, output_uri: str, node_selector: dict | None = None,
                     tolerations: list[dict] | None = None) -> dict:
    """A small LoRA FineTuneJob for KWOK GPU nodes: its pod is scheduled and "runs" but never
    trains (for operator behaviour at scale, not training)."""
    resources: dict = {"gpusPerNode": 1, "nodeSelector": node_selector or {"type": "kwok"}}
    if tolerations:
        resources["tolerations"] = tolerations
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name},
            "spec": {"baseModel": {"uri": "builtin://tiny-llama"},
                     "dataset": {"train": {"uri": "builtin://tiny-chat"}},
                     "method": {"type": "LoRA"}, "training": {"maxSteps": 10},
                     "resources": resources, "output": {"uri": output_uri}}}


@dataclass
class ClusterState:
    dir: Path
    kubeconfig: str = ""
    api_port: int = 0
    etcd_port: int = 0
    procs: list[dict] = field(default_factory=list)
    s3: dict = field(default_factory=dict)
    node: dict = field(default_factory=dict)  # the real node: index, sandbox pid, images
    addons: dict = field(default_factory=dict)  # e.g. {"flux": {"git": "http://…"}}

    @property
    def file(self) -> Path:
        return self.dir / "state.json"

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = {"kubeconfig": self.kubeconfig, "api_port": self.api_port,
                "etcd_port": self.etcd_port, "procs": self.procs, "s3": self.s3,
                "node": self.node, "addons": self.addons}
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.file)

    @classmethod
    def load(cls, directory: Path) -> "ClusterState | None":
        path = directory / "state.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return cls(dir=directory, **data)

    def proc_objs(self) -> list[procs.Proc]:
        return [procs.Proc(**p) for p in self.procs]

    def s3_info(self) -> s3.S3Info | None:
        return s3.S3Info(**self.s3) if self.s3 else None


class DevCluster:
    def __init__(self, directory: Path | None = None, *, with_s3: bool = True,
                 real_node: bool = True,
                 images: tuple[str, ...] = images_mod.PROJECT_TARGETS,
                 addons: tuple[str, ...] = ()):
        self.dir = (directory or default_dir()).resolve()
        unknown = set(addons) - set(ADDONS)
        if unknown:
            raise ValueError(f"unknown add-on(s) {sorted(unknown)}; known: {', '.join(ADDONS)}")
        self.addons = addons  # started after the cluster: "kueue"
        self.with_s3 = with_s3
        self.real_node = real_node
        self.images = images  # project images to build and load into the real node

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def bin_dir(self) -> Path:
        return self.dir / "bin"

    def state(self) -> ClusterState | None:
        return ClusterState.load(self.dir)

    def running(self) -> bool:
        state = self.state()
        return bool(state and state.procs and all(procs.alive(p) for p in state.proc_objs()))

    # ---- up --------------------------------------------------------------------------------
    def up(self, progress=lambda msg: print(msg, file=sys.stderr, flush=True)) -> ClusterState:
        if self.running():
            progress(f"Dev cluster already running in {self.dir}")
            state = self.state()
            if state.node:
                self._refresh_images(state, progress)
            self._start_addons(progress)
            return self.state()
        if self.state():
            self.down(progress=lambda _m: None)  # stale leftovers of a crashed run
        bins = toolchain.ensure_built()
        for addon in self.addons:
            for name in ADDON_TOOLS[addon]:
                toolchain.ensure_optional(name)
        built = self.build_images(progress) if self.real_node else {}
        if self.real_node:
            realnode.check_disk(self.dir / "node")
        self.dir.mkdir(parents=True, exist_ok=True)
        state = ClusterState(dir=self.dir, kubeconfig=str(self.kubeconfig))
        try:
            self._start(state, bins, built, progress)
            self._start_addons(progress)
        except BaseException:
            progress("Start-up failed; stopping what was started")
            self._stop(state)
            raise
        return state

    def _track(self, state: ClusterState, proc: procs.Proc) -> procs.Proc:
        state.procs.append(proc.to_dict())
        state.save()
        return proc

    def build_images(self, progress=lambda msg: print(msg, file=sys.stderr, flush=True)
                     ) -> dict[str, images_mod.Image]:
        """Every image the real node runs (built once per input digest, cached)."""
        missing = realnode.missing_requirements()
        if missing:
            raise realnode.RealNodeError(
                "this machine cannot run the dev cluster's real node; missing:\n  - "
                + "\n  - ".join(missing) + "\n(`kubetune dev-cluster build` installs the "
                "Debian packages when run as root)")
        t0 = time.monotonic()
        buildah = images_mod.Buildah()
        built = {"pause": images_mod.pause_image(buildah),
                 "coredns": images_mod.coredns_image(buildah)}
        if self.images:
            base = images_mod.python_base(buildah)
            built.update(images_mod.project_images(buildah, base, self.images))
        progress(f"Images ready in {time.monotonic() - t0:.1f}s: "
                 + ", ".join(i.name for i in built.values()))
        return built

    def _refresh_images(self, state: ClusterState, progress) -> None:
        """A running cluster after a code change: build the changed images (their code layer)
        and load them; `env` then names the new ones."""
        from .nodestart import load_images

        built = self.build_images(progress)
        new = [i for i in built.values() if i.name not in state.node["images"].values()]
        if new:
            load_images(self.dir / "node", state.node["registry"], new, progress)
            state.node["images"] = {k: v.name for k, v in built.items()}
            state.save()

    def _start(self, state: ClusterState, bins: dict[str, Path],
               built: dict[str, images_mod.Image], progress) -> None:
        t0 = time.monotonic()
        logs = self.dir / "logs"
        host = "127.0.0.1"
        if self.real_node:
            net = realnode.choose_net()
            sandbox = self._track(state, realnode.start_sandbox(self.dir / "node", net, logs))
            state.node = {"index": net.index, "sandbox_pid": realnode.sandbox_init_pid(sandbox)}
            state.save()
            host = net.host_ip
            progress(f"Started the real node's sandbox ({net.link}: host {net.host_ip}, "
                     f"node {net.node_ip}, pods {net.pod_cidr})")
        shutil.rmtree(self.dir / "pki", ignore_errors=True)  # a new cluster, a new address
        pki = pki_mod.generate(self.dir / "pki", host_ip=host)
        self.bin_dir.mkdir(exist_ok=True)
        for name in ("kubectl", "helm"):
            link = self.bin_dir / name
            link.unlink(missing_ok=True)
            link.symlink_to(bins[name])

        state.etcd_port = procs.free_port()
        peer = procs.free_port()
        etcd_dir = self.dir / "etcd"
        shutil.rmtree(etcd_dir, ignore_errors=True)
        etcd = self._track(state, procs.start("etcd", [
            str(bins["etcd"]), "--name=kubetune", f"--data-dir={etcd_dir}",
            f"--listen-client-urls=http://127.0.0.1:{state.etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{state.etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=kubetune=http://127.0.0.1:{peer}",
            f"--listen-metrics-urls=http://127.0.0.1:{procs.free_port()}",
            "--unsafe-no-fsync", "--quota-backend-bytes=4294967296", "--log-level=warn",
        ], logs / "etcd.log"))
        procs.wait_port(state.etcd_port, etcd, timeout=30)
        progress(f"Started etcd on 127.0.0.1:{state.etcd_port}")

        state.api_port = procs.free_port()
        server = f"https://{host}:{state.api_port}"
        # With a real node the apiserver serves on the node link's host side, where pods
        # reach it through the `kubernetes` Service (kube-proxy) with in-cluster config.
        node_flags = [
            "--endpoint-reconciler-type=lease",
            f"--kubelet-client-certificate={pki.admin_cert}",
            f"--kubelet-client-key={pki.admin_key}",
            "--kubelet-preferred-address-types=InternalIP",
        ] if self.real_node else ["--endpoint-reconciler-type=none"]
        apiserver = self._track(state, procs.start("kube-apiserver", [
            str(bins["kube-apiserver"]), f"--etcd-servers=http://127.0.0.1:{state.etcd_port}",
            f"--bind-address={host}", f"--secure-port={state.api_port}",
            f"--advertise-address={host}", *node_flags,
            f"--tls-cert-file={pki.server_cert}", f"--tls-private-key-file={pki.server_key}",
            f"--client-ca-file={pki.ca_cert}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--authorization-mode=Node,RBAC", "--service-cluster-ip-range=10.96.0.0/16",
            "--allow-privileged=true", "--max-requests-inflight=2000",
            "--max-mutating-requests-inflight=1000", "--event-ttl=2h", "--v=1",
        ], logs / "kube-apiserver.log"))
        procs.wait_port(state.api_port, apiserver, timeout=60, host=host)
        pki_mod.write_kubeconfig(self.kubeconfig, server, pki, pki.admin_cert, pki.admin_key)
        self._wait_readyz(pki, server, apiserver)
        api = self._api()
        progress(f"Started kube-apiserver on {server}")

        kcm_port = procs.free_port()
        self._track(state, procs.start("kube-controller-manager", [
            str(bins["kube-controller-manager"]), f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={kcm_port}", "--leader-elect=false",
            f"--service-account-private-key-file={pki.sa_key}",
            f"--root-ca-file={pki.ca_cert}", "--controllers=*",
            "--kube-api-qps=200", "--kube-api-burst=400", "--concurrent-job-syncs=20",
            "--node-monitor-grace-period=40s", "--v=1",
        ], logs / "kube-controller-manager.log"))
        sched_port = procs.free_port()
        self._track(state, procs.start("kube-scheduler", [
            str(bins["kube-scheduler"]), f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={sched_port}", "--leader-elect=false",
            "--kube-api-qps=200", "--kube-api-burst=400", "--v=1",
        ], logs / "kube-scheduler.log"))
        progress("Started kube-controller-manager and kube-scheduler")

        self._track(state, procs.start("kwok", [
            str(bins["kwok"]), f"--kubeconfig={self.kubeconfig}",
            f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
            f"--config={Path(__file__).with_name('kwok_stages.yaml')}",
            "--node-lease-duration-seconds=40",
            "--cidr=10.244.0.1/16", "--node-ip=10.244.0.1",
            f"--server-address=127.0.0.1:{procs.free_port()}",
        ], logs / "kwok.log"))
        core = _core(api)
        for spec in kwok_nodes():
            _create(lambda body=node_manifest(spec): core.create_node(body))
        progress("Started kwok with nodes " + ", ".join(n.name for n in kwok_nodes()))

        if self.with_s3:
            proc, info = s3.start(self.dir / "s3", host=host)
            self._track(state, proc)
            state.s3 = info.__dict__.copy()
            state.save()
            progress(f"Started SeaweedFS S3 on {info.endpoint} (bucket {info.bucket})")

        if self.real_node:
            node = RealNodeStarter(self.dir / "node", realnode.NodeNet(state.node["index"]),
                                   state.node["sandbox_pid"], pki, server, built, logs)
            node.start(lambda proc: self._track(state, proc), progress)
            state.node["images"] = {k: v.name for k, v in built.items()}
            state.node["registry"] = node.registry
            state.node["kubelet"] = node.kubelet_cmd
            state.save()

        names = [n.name for n in kwok_nodes()] + ([realnode.NODE_NAME] if self.real_node else [])
        self._wait_nodes_ready(core, names, state)
        if self.real_node:
            node.after_ready(api, progress)
        self._wait_default_sa(core)
        state.save()
        progress(f"Dev cluster ready in {time.monotonic() - t0:.1f}s")

    def _api(self):
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def _wait_readyz(self, pki: pki_mod.Pki, server: str, proc: procs.Proc,
                     timeout: float = 90) -> None:
        import ssl
        import urllib.request

        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        ctx.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not procs.alive(proc):
                raise RuntimeError(f"kube-apiserver exited:\n{procs.tail(Path(proc.log))}")
            try:
                with urllib.request.urlopen(f"{server}/readyz", context=ctx,
                                            timeout=5) as resp:
                    if resp.status == 200:
                        return
            except Exception as exc:  # noqa: BLE001 - not ready yet
                last = str(exc)
            time.sleep(0.3)
        raise RuntimeError(f"kube-apiserver not ready within {timeout:.0f}s: {last[:500]}")

    def _wait_nodes_ready(self, core, names: list[str], state: ClusterState,
                          timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        pending = set(names)
        while time.monotonic() < deadline:
            for p in state.proc_objs():
                if not procs.alive(p):
                    raise RuntimeError(f"{p.name} exited during start-up:\n"
                                       f"{procs.tail(Path(p.log))}")
            for node in core.list_node().items:
                ready = any(c.type == "Ready" and c.status == "True"
                            for c in node.status.conditions or [])
                if ready:
                    pending.discard(node.metadata.name)
            if not pending:
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not Ready within {timeout:.0f}s: {sorted(pending)}")

    def _wait_default_sa(self, core, timeout: float = 60) -> None:
        from kubernetes.client.rest import ApiException

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                core.read_namespaced_service_account("default", "default")
                return
            except ApiException:
                time.sleep(0.3)
        raise RuntimeError("the service-account controller created no default ServiceAccount")

    # ---- the real node's kubelet (node failure tests) -----------------------------------------
    def stop_kubelet(self) -> None:
        """Stop the real node's kubelet (its containers keep running, as on a node whose
        kubelet died); the node goes NotReady once its lease expires."""
        state = self.state()
        kubelet = next(p for p in state.proc_objs() if p.name == "kubelet")
        procs.stop(kubelet)
        state.procs = [p for p in state.procs if p["name"] != "kubelet"]
        state.save()

    def start_kubelet(self, timeout: float = 90) -> None:
        """Start the kubelet again; returns once the node is Ready, its GPUs advertised."""
        from .nodestart import advertise_gpus

        state = self.state()
        if any(p["name"] == "kubelet" for p in state.procs):
            return
        cmd = realnode.node_command(state.node["sandbox_pid"], state.node["kubelet"])
        self._track(state, procs.start("kubelet", cmd, self.dir / "logs" / "kubelet.log"))
        api = self._api()
        self._wait_nodes_ready(_core(api), [realnode.NODE_NAME], state, timeout=timeout)
        advertise_gpus(api)

    # ---- add-ons ---------------------------------------------------------------------------
    def _start_addons(self, progress) -> None:
        if "kueue" in self.addons:
            self.start_kueue(progress)
        if "flux" in self.addons:
            self.start_flux(progress)
        if "mlflow" in self.addons:
            self.start_mlflow(progress)

    def host(self) -> str:
        """The address the cluster's servers bind: where the real node's pods reach the host
        (S3's address), else loopback."""
        from urllib.parse import urlsplit

        state = self.state()
        endpoint = (state.s3 or {}).get("endpoint") if state else None
        return (urlsplit(endpoint).hostname if endpoint else None) or "127.0.0.1"

    def start_mlflow(self, progress=lambda msg: print(msg, file=sys.stderr, flush=True)) -> str:
        """An MLflow tracking server (SQLite, artifacts in the cluster folder) on the running
        cluster, kept until `down` (stopped by PID like every process of the cluster);
        returns its URL."""
        from . import mlflow

        state = self.state()
        running = [p for p in state.proc_objs() if p.name == "mlflow"]
        if running and all(procs.alive(p) for p in running) and state.addons.get("mlflow"):
            return state.addons["mlflow"]["url"]
        for proc in running:  # died: start again (same folder, same port, same runs)
            procs.stop(proc)
        state.procs = [p for p in state.procs if p["name"] != "mlflow"]
        proc, url = mlflow.start(self.dir / "mlflow", host=self.host(), progress=progress)
        self._track(state, proc)
        state.addons["mlflow"] = {"url": url}
        state.save()
        progress(f"Started the MLflow tracking server on {url}")
        return url

    def flux(self):
        from .flux import Flux

        return Flux(self.dir, self.kubeconfig, self.bin_dir / "kubectl")

    def start_flux(self, progress=lambda msg: print(msg, file=sys.stderr, flush=True)) -> str:
        """Flux's source- and kustomize-controller and the Git server on the running cluster;
        returns the Git server's base URL (repositories at `<url>/<name>.git`)."""
        state = self.state()
        names = ("git-http", *ADDON_TOOLS["flux"])
        running = [p for p in state.proc_objs() if p.name in names]
        if len(running) == len(names) and all(procs.alive(p) for p in running) and \
                state.addons.get("flux"):
            return state.addons["flux"]["git"]
        for proc in running:  # a part died: all three start again
            procs.stop(proc)
        state.procs = [p for p in state.procs if p["name"] not in names]
        for name in ADDON_TOOLS["flux"]:
            toolchain.ensure_optional(name)
        port = self.flux().start(self.dir / "logs", progress,
                                 lambda proc: self._track(state, proc))
        state.addons["flux"] = {"git": f"http://127.0.0.1:{port}"}
        state.save()
        return state.addons["flux"]["git"]

    def _kueue(self):
        from .kueue import Kueue

        return Kueue(self.dir, self.kubeconfig, self.bin_dir / "kubectl",
                     pki_mod.Pki(self.dir / "pki"))

    def start_kueue(self, progress=lambda msg: print(msg, file=sys.stderr, flush=True),
                    queues: bool = True) -> None:
        """Kueue on the running cluster (kept running until `down` or `stop_kueue`), with the
        default ResourceFlavor, ClusterQueue and LocalQueue unless `queues` is False."""
        from .kueue import default_queues

        state = self.state()
        if any(p.name == "kueue" and procs.alive(p) for p in state.proc_objs()):
            return
        toolchain.ensure_optional("kueue")
        kueue = self._kueue()
        self._track(state, kueue.start(self.dir / "logs", progress))
        if queues:
            kueue.apply(default_queues())
            progress("Kueue queues: ClusterQueue kubetune-gpus, LocalQueue default/gpus")

    def stop_kueue(self) -> None:
        """Unregister Kueue's webhooks, then stop it (its CRDs and objects stay)."""
        state = self.state()
        kueue = [p for p in state.proc_objs() if p.name == "kueue"]
        if kueue:
            self._kueue().remove_webhooks()
        for proc in kueue:
            procs.stop(proc)
        state.procs = [p for p in state.procs if p["name"] != "kueue"]
        state.save()

    # ---- down ------------------------------------------------------------------------------
    def down(self, progress=lambda msg: print(msg, file=sys.stderr, flush=True)) -> None:
        state = self.state()
        if not state:
            progress(f"No dev cluster in {self.dir}")
            return
        self._stop(state)
        progress(f"Stopped the dev cluster in {self.dir}")

    @staticmethod
    def _stop(state: ClusterState) -> None:
        # Reverse start order: agents and controllers first, etcd last, the node's sandbox
        # (whose end ends every process of the node) at the very end.
        for proc in reversed(state.proc_objs()):
            procs.stop(proc)
        if state.node:
            net = realnode.NodeNet(state.node["index"])
            left = realnode.remove_cgroups(net.cgroup)
            realnode.remove_link(net)
            # Unpacked images (gigabytes): pulled again from the registry by the next `up`.
            shutil.rmtree(state.dir / "node" / "containerd", ignore_errors=True)
            images_mod.collect_garbage(state.dir / "registry.yaml",
                                       list((state.node.get("images") or {}).values()),
                                       state.dir / "logs" / "registry-gc.log")
            if left:
                raise RuntimeError(f"could not remove the real node's cgroups: {left[:5]}")
        state.procs = []
        state.save()
        state.file.unlink(missing_ok=True)

    # ---- env / status ----------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        state = self.state()
        if not state:
            raise RuntimeError(f"no dev cluster in {self.dir}: run `kubetune dev-cluster up`")
        env = {"KUBECONFIG": state.kubeconfig,
               "PATH": f"{self.bin_dir}:{os.environ.get('PATH', '')}"}
        info = state.s3_info()
        if info:
            env.update(info.env())
            env["KUBETUNE_S3_ENDPOINT"] = info.endpoint
        for target, name in (state.node.get("images") or {}).items():
            if target in images_mod.PROJECT_TARGETS:
                env[f"KUBETUNE_{target.upper()}_IMAGE"] = name
        if (state.addons.get("flux") or {}).get("git"):
            env["KUBETUNE_GIT_URL"] = state.addons["flux"]["git"]  # repositories: <url>/<n>.git
        if (state.addons.get("mlflow") or {}).get("url"):
            env["KUBETUNE_MLFLOW_URL"] = state.addons["mlflow"]["url"]
        return env

    def status(self) -> dict:
        state = self.state()
        if not state:
            return {"running": False, "dir": str(self.dir)}
        result = {"running": True, "dir": str(self.dir), "kubeconfig": state.kubeconfig,
                  "processes": {p.name: {"pid": p.pid, "alive": procs.alive(p)}
                                for p in state.proc_objs()}}
        if state.s3:
            result["s3"] = {"endpoint": state.s3["endpoint"], "bucket": state.s3["bucket"]}
        try:
            core = _core(self._api())
            result["nodes"] = [{
                "name": n.metadata.name,
                "ready": any(c.type == "Ready" and c.status == "True"
                             for c in n.status.conditions or []),
                "gpus": (n.status.allocatable or {}).get(GPU_RESOURCE, "0"),
                "real": (n.metadata.labels or {}).get("kubetune.io/real-node") == "true",
            } for n in core.list_node().items]
        except Exception as exc:  # noqa: BLE001 - status reports, never raises
            result["nodes_error"] = str(exc)
        result["running"] = all(p["alive"] for p in result["processes"].values())
        return result


def _core(api):
    from kubernetes import client

    return client.CoreV1Api(api)


def _create(fn) -> None:
    from kubernetes.client.rest import ApiException

    try:
        fn()
    except ApiException as exc:
        if exc.status != 409:
            raise
