"""Operator scale: N FineTuneJobs on KWOK GPU nodes versus a plain client creating N Jobs.

Same run, same fresh dev cluster: (a) a plain client script creates N batch/v1 Jobs (one GPU
pod each) and waits until every pod is Running; (b) N FineTuneJobs are applied to the operator
and we wait until every one has its Job and status phase Running; then (a) again, on the
cluster (b) left (each later half runs among the earlier halves' objects: the ratio is given to
the first plain half and to the mean of both). Prints the times, the ratios,
the operator's peak RSS and its API requests per job (reconcile requests; watches excluded).
Also the latency of one FineTuneJob apply → its Job created (p50, p95 of --probes applies, with
0 and with N FineTuneJobs present), and the operator's API requests in an idle window after
everything runs (--idle seconds; it should not grow with N: watches, not polling), measured
twice: with the FineTuneJobs only, then with --adapters LoRAAdapters added (a published tiny
artifact each; half verified only, half targeting an opted-in Deployment scaled to zero, so
their resyncs read the caches and S3 but no serving pod).

    python bench/operator_scale.py [--jobs 200] [--probes 10] [--idle 60] [--adapters 100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from kubernetes import client, config

from kubetune.devcluster import procs
from kubetune.devcluster.cluster import DevCluster, NodeSpec, kwok_finetunejob, node_manifest

ROOT = Path(__file__).resolve().parents[1]
GPU = {"nvidia.com/gpu.present": "true", "kubetune.io/pool": "gpu"}


def pod_template(name: str) -> dict:
    return {"metadata": {"labels": {"bench": name}}, "spec": {
        "restartPolicy": "Never", "nodeSelector": {"type": "kwok"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
        "containers": [{"name": "trainer", "image": "trainer",
                        "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}


class Watcher(threading.Thread):
    """Counts objects Running from one watch, started before the creates. Each change arrives
    once; a poll (LIST every half second, as this bench did until 2026-11-30) re-read every
    object each time, a cost that grew with the run and was larger for FineTuneJobs than for
    pods: the observer, not the operator, took a share of the apiserver."""

    def __init__(self, list_fn, args: tuple, name_and_phase, target: int):
        super().__init__(daemon=True)
        self.list_fn, self.args, self.name_and_phase = list_fn, args, name_and_phase
        self.target, self.phases, self.running = target, {}, 0
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        from kubernetes import watch

        stream = watch.Watch()
        for event in stream.stream(self.list_fn, *self.args, timeout_seconds=900):
            name, phase = self.name_and_phase(event["object"])
            self.running -= self.phases.pop(name, None) == "Running"
            if event["type"] != "DELETED":
                self.phases[name] = phase
                self.running += phase == "Running"
            if self.running >= self.target:
                self.done.set()
                stream.stop()

    def wait(self, timeout: float = 900) -> None:
        if not self.done.wait(timeout):
            raise SystemExit("timed out")


def wait(predicate, timeout=900, interval=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise SystemExit("timed out")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--operator-from", type=Path, default=None,
                        help="run the operator from another checkout (a before/after "
                             "comparison in the same conditions), e.g. a `git worktree`")
    parser.add_argument("--apiserver-profile", type=Path, default=None,
                        help="write kube-apiserver's CPU profiles (pprof) of each half, the "
                             "--profile-seconds from its first create, to PREFIX-plain.pprof "
                             "and PREFIX-kubetune.pprof; read them with `go tool pprof -top`")
    parser.add_argument("--profile-seconds", type=int, default=30)
    args = parser.parse_args()
    n = args.jobs
    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-op-"))
    dev = DevCluster(work / "cluster", real_node=False)  # KWOK nodes only
    dev.up(progress=lambda m: None)
    try:
        api = config.new_client_from_config(config_file=str(dev.kubeconfig))
        core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
        custom = client.CustomObjectsApi(api)
        nodes = (3 * n + 2 * args.probes) // 8 + 2
        for i in range(nodes):  # GPU capacity for both halves and the probes
            core.create_node(node_manifest(NodeSpec(f"bench-gpu-{i}", 8, GPU, [])))
        env = {**os.environ, **dev.env()}
        subprocess.run(["kubectl", "apply", "-f", str(ROOT / "crds")], env=env, check=True,
                       capture_output=True)
        for ns in ("plain", "operator", "plain-again"):
            core.create_namespace({"metadata": {"name": ns}})
        time.sleep(2)
        s3 = dev.state().s3_info()
        core.create_namespaced_secret("operator", {"metadata": {"name": "s3-creds"},
                                                   "stringData": {
            "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}})

        # (a) the floor: a plain client creating Jobs directly.
        profiler = _start_profile(api, args, "plain")
        plain, parts_plain = _plain(core, batch, "plain", n)
        if profiler:
            profiler.join()

        # (b) the operator.
        health, metrics = procs.free_port(), procs.free_port()
        op_env = {**env, "KUBETUNE_S3_CREDENTIALS_SECRET": "s3-creds"}
        if args.operator_from:
            src = args.operator_from.resolve()
            op_env["PYTHONPATH"] = os.pathsep.join(str(src / d) for d in ("", "operator",
                                                                           "trainer"))
        op = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "operator",
                               "--namespace=operator", f"--health-port={health}",
                               f"--metrics-port={metrics}", "--bind=127.0.0.1", "--json-logs"],
                              env=op_env, cwd=args.operator_from or None,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait(lambda: _ok(f"http://127.0.0.1:{health}/healthz"), timeout=60, interval=0.2)
        empty = _apply_latencies(custom, batch, "probe0", args.probes)
        wait(lambda: sum((i.get("status") or {}).get("phase") == "Running" for i in
                         custom.list_namespaced_custom_object(
                             "kubetune.io", "v1alpha1", "operator", "finetunejobs")["items"])
             >= args.probes)  # settled: their requests are not counted below
        before, verbs0 = _requests(metrics), _by_verb(metrics)
        watcher = Watcher(custom.list_namespaced_custom_object,
                          ("kubetune.io", "v1alpha1", "operator", "finetunejobs"),
                          lambda o: (o["metadata"]["name"], (o.get("status") or {}).get("phase")),
                          n + args.probes)
        profiler = _start_profile(api, args, "kubetune")
        cpu0, parts0 = _cpu_seconds(op.pid), _cluster_cpu()
        t0 = time.monotonic()
        for i in range(n):
            body = kwok_finetunejob(f"ftj-{i}", f"s3://kubetune/bench/ftj-{i}")
            custom.create_namespaced_custom_object("kubetune.io", "v1alpha1", "operator",
                                                   "finetunejobs", body)

        watcher.wait()
        operated = time.monotonic() - t0
        cpu = _cpu_seconds(op.pid) - cpu0
        parts_operated = _minus(_cluster_cpu(), parts0)
        requests = _requests(metrics) - before
        verbs = {k: v - verbs0.get(k, 0) for k, v in _by_verb(metrics).items()}
        if profiler:
            profiler.join()
        full = _apply_latencies(custom, batch, "probe1", args.probes)
        # (a) again, on the cluster as the kubetune half left it (its Jobs and pods present,
        # as the plain half's were for it): the order of the halves is not what is measured.
        again, _ = _plain(core, batch, "plain-again", n)
        time.sleep(5)  # the probes' own aftermath
        idle_start, idle_cpu = _requests(metrics), _cpu_seconds(op.pid)
        time.sleep(args.idle)
        idle = (_requests(metrics) - idle_start) * 60 / args.idle
        idle_cpu = (_cpu_seconds(op.pid) - idle_cpu) / args.idle * 100
        rss_jobs = _peak_rss_mib(op.pid)
        adapters_idle = adapters_cpu = None
        if args.adapters:
            _apply_adapters(dev, api, work, args.adapters)
            time.sleep(5)
            idle_start, adapters_cpu = _requests(metrics), _cpu_seconds(op.pid)
            time.sleep(args.idle)
            adapters_idle = (_requests(metrics) - idle_start) * 60 / args.idle
            adapters_cpu = (_cpu_seconds(op.pid) - adapters_cpu) / args.idle * 100
        rss = _peak_rss_mib(op.pid)
        op.terminate()
        op.wait(timeout=30)
        jobs = len(batch.list_namespaced_job("operator").items)
        per_verb = ", ".join(f"{k} {v / n:.1f}" for k, v in sorted(verbs.items()) if v)
        print(f"{n} jobs on KWOK GPU nodes ({nodes} nodes x 8 GPUs)")
        print(f"  plain client, Jobs -> pods Running:        {plain:8.1f}s   "
              f"again after the kubetune half {again:.1f}s")
        print(f"  kubetune, FineTuneJobs -> status Running: {operated:8.1f}s   "
              f"ratio {operated / plain:.2f} (to the first plain half), "
              f"{operated / ((plain + again) / 2):.2f} (to the mean of both)")
        print(f"  operator CPU {cpu:.1f}s ({cpu / operated * 100:.0f}% of one core, "
              f"{cpu / n * 1000:.0f} ms per job); peak RSS {rss_jobs:.0f} MiB with the jobs, "
              f"{rss:.0f} MiB at the end; reconcile API "
              f"requests per job "
              f"{requests / n:.1f} ({per_verb}); "
              f"Jobs created {jobs} (expected {n + 2 * args.probes})")
        for label, parts in (("plain client", parts_plain), ("kubetune", parts_operated)):
            print(f"  cluster CPU during {label}: " + ", ".join(
                f"{k} {v:.1f}s" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])))
        print(f"  one apply -> Job created: with 0 present p50 {_pct(empty, 50):.3f}s "
              f"p95 {_pct(empty, 95):.3f}s; with {n + args.probes} present "
              f"p50 {_pct(full, 50):.3f}s p95 {_pct(full, 95):.3f}s")
        print(f"  idle: {idle:.1f} API requests per minute (operator CPU {idle_cpu:.1f}% of a "
              f"core) with {n + 2 * args.probes} FineTuneJobs present" + (
                  "" if adapters_idle is None else
                  f"; {adapters_idle:.1f} (CPU {adapters_cpu:.1f}%) with {args.adapters} "
                  f"LoRAAdapters added"))
    finally:
        dev.down(progress=lambda m: None)
        shutil.rmtree(work, ignore_errors=True)  # the cluster, artifacts and models of this run
    return 0


def _apply_adapters(dev, api, work: Path, count: int) -> None:
    """`count` LoRAAdapters of one published tiny artifact, applied and settled (each has
    written its status once): half without a target, half on an opted-in Deployment with no
    replicas. Their requests while settling are not counted in the idle window."""
    sys.path.insert(0, str(ROOT / "tests"))
    from adapterfactory import make_adapter, publish

    from kubetune.storage import Storage

    s3 = dev.state().s3_info()
    storage = Storage(s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key)
    uri = f"s3://{s3.bucket}/bench/adapter"
    digest = publish(storage, uri, make_adapter(work / "adapter", "LoRA", seed=0))
    client.AppsV1Api(api).create_namespaced_deployment("operator", {
        "metadata": {"name": "srv", "labels": {"kubetune.io/adapter-target": "true"}},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "srv"}},
                 "template": {"metadata": {"labels": {"app": "srv"}},
                              "spec": {"containers": [{"name": "server", "image": "serve"}]}}}})
    custom = client.CustomObjectsApi(api)
    for i in range(count):
        spec = {"baseModel": {"uri": "builtin://tiny-llama", "revision": "v1"},
                "source": {"uri": uri, "sha256": digest}, "servingName": f"bench-{i}"}
        if i % 2:
            spec["target"] = {"deployment": "srv"}
        custom.create_namespaced_custom_object("kubetune.io", "v1alpha1", "operator",
                                               "loraadapters", {
            "apiVersion": "kubetune.io/v1alpha1", "kind": "LoRAAdapter",
            "metadata": {"name": f"bench-{i}"}, "spec": spec})
    wait(lambda: sum(bool((a.get("status") or {}).get("conditions")) for a in
                     custom.list_namespaced_custom_object("kubetune.io", "v1alpha1", "operator",
                                                          "loraadapters")["items"]) >= count,
         timeout=300, interval=1)


def _plain(core, batch, namespace: str, n: int) -> tuple[float, dict[str, float]]:
    """A plain client creates `n` Jobs (one GPU pod each): seconds until every pod runs, and
    the cluster's CPU meanwhile."""
    watcher = Watcher(core.list_namespaced_pod, (namespace,),
                      lambda p: (p.metadata.name, p.status.phase), n)
    parts0 = _cluster_cpu()
    t0 = time.monotonic()
    for i in range(n):
        batch.create_namespaced_job(namespace, {"metadata": {"name": f"plain-{i}"},
                                                "spec": {"backoffLimit": 0,
                                                         "template": pod_template("plain")}})
    watcher.wait()
    return time.monotonic() - t0, _minus(_cluster_cpu(), parts0)


def _start_profile(api, args, half: str) -> threading.Thread | None:
    if not args.apiserver_profile:
        return None
    path = args.apiserver_profile.with_name(f"{args.apiserver_profile.name}-{half}.pprof")
    thread = threading.Thread(target=_profile, args=(api, path, args.profile_seconds),
                              daemon=True)
    thread.start()
    time.sleep(0.2)  # its window has begun
    return thread


def _profile(api, path: Path, seconds: int) -> None:
    """kube-apiserver's CPU profile over the next `seconds` (its /debug/pprof, on by default)."""
    method, url, headers, _, _ = api.param_serialize(
        "GET", "/debug/pprof/profile", query_params=[("seconds", seconds)],
        auth_settings=["BearerToken"])
    path.write_bytes(api.call_api(method, url, headers, _request_timeout=seconds + 30).read())


def _apply_latencies(custom, batch, prefix: str, count: int) -> list[float]:
    """Apply FineTuneJobs one at a time; seconds from the create call until its Job exists."""
    from kubernetes.client.exceptions import ApiException

    out = []
    for i in range(count):
        name = f"{prefix}-{i}"
        t0 = time.monotonic()
        custom.create_namespaced_custom_object(
            "kubetune.io", "v1alpha1", "operator", "finetunejobs",
            kwok_finetunejob(name, f"s3://kubetune/bench/{name}"))
        while True:
            try:
                batch.read_namespaced_job(f"{name}-0", "operator")
                break
            except ApiException as exc:
                if exc.status != 404 or time.monotonic() - t0 > 120:
                    raise
                time.sleep(0.005)
        out.append(time.monotonic() - t0)
    return out


def _pct(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


def _requests(port: int) -> float:
    return sum(_by_verb(port).values())


def _by_verb(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    return {verb: float(value) for verb, value in re.findall(
        r'^kubetune_api_requests_total\{verb="([^"]*)"\} (\S+)$', text, flags=re.M)}


CLUSTER_PARTS = ("kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler", "kwok")


def _cluster_cpu() -> dict[str, float]:
    """CPU seconds so far of the dev cluster's processes, by name (the bench's own included:
    the machine is shared, and the ratio is a wall-clock one)."""
    out: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            name = next((p for p in CLUSTER_PARTS if p[:15] == comm), None)  # comm: 15 chars
            if name:
                out[name] = out.get(name, 0.0) + _cpu_seconds(int(entry.name))
        except OSError:
            continue
    out["bench client"] = _cpu_seconds(os.getpid())
    # CPU time the hypervisor gave to others while this machine wanted it (a VM's "steal"):
    # a half that lost much of it ran on a slower machine than the other.
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    out["steal (machine)"] = int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0
    return out


def _minus(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


if __name__ == "__main__":
    sys.exit(main())
