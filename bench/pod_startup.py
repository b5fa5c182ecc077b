"""Pod start on the real node: `kubectl create` of a pod → Running (and → its container's
first output), against the floor measured in the same run on the same node: containerd
starting the same image directly (`ctr run`, no Kubernetes).

A fresh dev cluster with its real node; --rounds pods of the `operator` image (our smallest with
Python) and of the `trainer` image (6.7 GB, torch). Prints medians, p95 and the ratios.

    python bench/pod_startup.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kubernetes import client, config

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from helpers import wait_for  # noqa: E402

from kubetune.devcluster import realnode  # noqa: E402
from kubetune.devcluster.cluster import DevCluster  # noqa: E402

CODE = "print('started', flush=True)"


def pod(name: str, image: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {
        "restartPolicy": "Never", "nodeSelector": {"kubetune.io/real-node": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
        "containers": [{"name": "main", "image": image, "command": ["python", "-c", CODE]}]}}


def floor(dev: DevCluster, image: str, rounds: int) -> list[float]:
    """containerd alone: create + start the container and run it until it exits. `ctr` runs
    inside the node's namespaces (its FIFOs live on the node's /run) and the container in the
    node's cgroup root, which `down` removes."""
    node = dev.state().node
    sock = realnode.socket_path(dev.dir / "node")
    cgroup = realnode.NodeNet(node["index"]).cgroup
    out = []
    for i in range(rounds):
        t0 = time.monotonic()
        proc = subprocess.run(realnode.node_command(node["sandbox_pid"], [
            "ctr", f"--address={sock}", "--namespace=k8s.io", "run", "--rm",
            f"--cgroup=/{cgroup}/bench-floor-{i}", image, f"bench-floor-{i}",
            "python", "-c", CODE]), capture_output=True, text=True, timeout=300)
        out.append(time.monotonic() - t0)
        assert proc.returncode == 0 and "started" in proc.stdout, proc.stderr
    return out


def kube(core, ns: str, image: str, tag: str, rounds: int) -> tuple[list[float], list[float]]:
    running, finished = [], []
    for i in range(rounds):
        name = f"{tag}-{i}"
        t0 = time.monotonic()
        core.create_namespaced_pod(ns, pod(name, image))
        wait_for(lambda: core.read_namespaced_pod(name, ns).status.phase in
                 ("Running", "Succeeded"), 300, 0.02)
        running.append(time.monotonic() - t0)
        wait_for(lambda: core.read_namespaced_pod(name, ns).status.phase == "Succeeded",
                 300, 0.02)
        finished.append(time.monotonic() - t0)
        assert "started" in core.read_namespaced_pod_log(name, ns)
        core.delete_namespaced_pod(name, ns, grace_period_seconds=0)
    return running, finished


def p95(values: list[float]) -> float:
    return sorted(values)[max(0, round(0.95 * len(values)) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-pods-"))
    dev = DevCluster(work / "cluster",
                     images=("operator", "trainer"))
    dev.up(progress=lambda m: None)
    try:
        env = dev.env()
        api = config.new_client_from_config(config_file=str(dev.kubeconfig))
        core = client.CoreV1Api(api)
        core.create_namespace({"metadata": {"name": "bench"}})
        wait_for(lambda: core.list_namespaced_service_account("bench").items, 30, 0.2)
        print(f"Pod start on the real node, {args.rounds} rounds each (median / p95)")
        for target in ("operator", "trainer"):
            image = env[f"KUBETUNE_{target.upper()}_IMAGE"]
            base = floor(dev, image, args.rounds)
            running, finished = kube(core, "bench", image, target, args.rounds)
            f = statistics.median(base)
            print(f"  {target:<9} floor (ctr run → exit):      {f:5.2f}s / {p95(base):5.2f}s")
            print(f"  {target:<9} create → Running:             "
                  f"{statistics.median(running):5.2f}s / {p95(running):5.2f}s")
            print(f"  {target:<9} create → Succeeded (exited):  "
                  f"{statistics.median(finished):5.2f}s / {p95(finished):5.2f}s   "
                  f"ratio {statistics.median(finished) / f:.2f}")
    finally:
        dev.down(progress=lambda m: None)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
