"""Adapter rollout latency: applying a LoRAAdapter → loaded on every replica (status
replicas.loaded == desired), versus the bare floor measured in the same run on the same
replicas: one load call on every replica at once, in which each downloads the artifact from S3
(and, for reference, the same on one replica alone).

A fresh dev cluster (real control plane, the real node, SeaweedFS), a `kubetune serve`
Deployment with --replicas pods (tiny Llama, the `serve` image), the operator with its default
settings. Each round uses a fresh artifact (nothing cached). Prints medians and the ratio.
"Loaded" is the operator's status: listed by every replica *and* behaviour-verified (each
replica answered the manifest's probe like the trained adapter).

With --real: the real model (SmolLM2-135M-Instruct) and a realistic artifact, LoRA r=64 on
every linear layer (~80 MB), instead of tiny Llama and a rank-8 LoRA.

    python bench/adapter_load.py [--replicas 2] [--rounds 5] [--real]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kubernetes import client, config

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "serving")]

from adapterfactory import make_adapter, make_lora_on, publish  # noqa: E402
from helpers import wait_for  # noqa: E402
from servingutil import call, ready_pods, serve_deployment  # noqa: E402

from kubetune.devcluster import procs  # noqa: E402
from kubetune.devcluster.cluster import DevCluster  # noqa: E402
from kubetune.storage import Storage  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--real", action="store_true",
                        help="SmolLM2-135M-Instruct and LoRA r=64 on all linear layers")
    args = parser.parse_args()
    model = "builtin://smollm2-135m-instruct" if args.real else "builtin://tiny-llama"
    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-adapter-"))
    dev = DevCluster(work / "cluster")
    dev.up(progress=lambda m: None)
    op = None
    try:
        env = {**os.environ, **dev.env()}
        os.environ.update({k: v for k, v in env.items() if k.endswith("_IMAGE")})
        s3 = dev.state().s3_info()
        storage = Storage(s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key)
        api = config.new_client_from_config(config_file=str(dev.kubeconfig))
        core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
        custom = client.CustomObjectsApi(api)
        subprocess.run(["kubectl", "apply", "-f", str(ROOT / "crds")], env=env, check=True,
                       capture_output=True)
        ns = "bench"
        core.create_namespace({"metadata": {"name": ns}})
        wait_for(lambda: core.list_namespaced_service_account(ns).items, 30, 0.2)
        core.create_namespaced_secret(ns, {"metadata": {"name": "s3-creds"}, "stringData": {
            "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}})
        apps.create_namespaced_deployment(ns, serve_deployment(
            "srv", args.replicas, model=model, max_rank=64, endpoint=s3.endpoint))
        wait_for(lambda: len(ready_pods(_Cluster(api), ns, "srv")) == args.replicas, 300, 0.5)
        pods = ready_pods(_Cluster(api), ns, "srv")

        artifacts = []
        base = None
        if args.real:
            from kubetune_trainer.sources import resolve_model

            base = resolve_model(model, None, work / "models", storage)
        for i in range(2 * args.rounds):
            uri = f"s3://{s3.bucket}/bench/a{i}"
            if args.real:
                directory = make_lora_on(base, work / f"a{i}", 64, seed=i)
                artifacts.append((uri, publish(storage, uri, directory, "LoRA", 64,
                                               base_uri=model, revision=None, base=base)))
            else:
                directory = make_adapter(work / f"a{i}", "LoRA", seed=i)
                artifacts.append((uri, publish(storage, uri, directory)))
        size = sum(f.stat().st_size for f in (work / "a0").rglob("*") if f.is_file())

        # (a) the floor, as the goal defines it: one download + one load call per replica,
        # every replica at once (as the operator does), and for reference one replica alone.
        # Each round loads a fresh artifact: the server downloads it from S3 in the call.
        floor, floor_one = [], []
        for i in range(args.rounds):
            uri, _ = artifacts[i]
            t0 = time.monotonic()
            status, body = call(pods[0]["ip"], "/v1/load_lora_adapter",
                                {"lora_name": f"one{i}", "lora_path": uri})
            floor_one.append(time.monotonic() - t0)
            assert status == 200, body
            call(pods[0]["ip"], "/v1/unload_lora_adapter", {"lora_name": f"one{i}"})

            def load(p, i=i, uri=uri):
                return call(p["ip"], "/v1/load_lora_adapter",
                            {"lora_name": f"floor{i}", "lora_path": uri})
            t0 = time.monotonic()
            with ThreadPoolExecutor(len(pods)) as pool:
                answers = list(pool.map(load, pods))
            floor.append(time.monotonic() - t0)
            assert all(status == 200 for status, _ in answers), answers
            for p in pods:
                call(p["ip"], "/v1/unload_lora_adapter", {"lora_name": f"floor{i}"})

        # (b) the operator: apply → loaded on every replica.
        health, metrics = procs.free_port(), procs.free_port()
        op = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "operator",
                               f"--namespace={ns}", f"--health-port={health}",
                               f"--metrics-port={metrics}", "--bind=127.0.0.1"],
                              env={**env, "KUBETUNE_S3_CREDENTIALS_SECRET": "s3-creds"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _ok(f"http://127.0.0.1:{health}/healthz"), 60, 0.2)
        operated = []
        for i in range(args.rounds):
            uri, digest = artifacts[args.rounds + i]
            name = f"bench-{i}"
            t0 = time.monotonic()
            custom.create_namespaced_custom_object("kubetune.io", "v1alpha1", ns,
                                                   "loraadapters",
                                                   _adapter(name, uri, digest, model))

            def loaded():
                st = custom.get_namespaced_custom_object("kubetune.io", "v1alpha1", ns,
                                                         "loraadapters", name).get("status") or {}
                r = st.get("replicas") or {}
                return r.get("desired") == args.replicas and r.get("loaded") == args.replicas
            wait_for(loaded, 300, 0.02)
            operated.append(time.monotonic() - t0)
            custom.delete_namespaced_custom_object("kubetune.io", "v1alpha1", ns,
                                                   "loraadapters", name)
            wait_for(lambda: not custom.list_namespaced_custom_object(
                "kubetune.io", "v1alpha1", ns, "loraadapters")["items"], 60, 0.1)
        f, o = statistics.median(floor), statistics.median(operated)
        f1 = statistics.median(floor_one)
        what = "LoRA r=64 on all linear layers of SmolLM2-135M" if args.real else \
            "LoRA r=8 on tiny Llama"
        print(f"{what} ({size / 1e6:.1f} MB), {args.replicas} kubetune serve replicas, "
              f"{args.rounds} rounds (medians)")
        print(f"  floor: one load call incl. its S3 download on each of the {args.replicas} "
              f"replicas at once: {f:6.2f}s  (1 replica alone: {f1:.2f}s)")
        print(f"  kubetune: apply LoRAAdapter -> loaded and behaviour-verified on "
              f"{args.replicas}/{args.replicas} (status): {o:6.2f}s   ratio {o / f:.2f} "
              f"(vs 1 replica alone {o / f1:.2f})")
        print(f"  all rounds: floor {[round(x, 2) for x in floor]} one replica "
              f"{[round(x, 2) for x in floor_one]} operator {[round(x, 2) for x in operated]}")
    finally:
        if op is not None:
            op.terminate()
            op.wait(timeout=30)
        dev.down(progress=lambda m: None)
        shutil.rmtree(work, ignore_errors=True)  # the cluster, artifacts and models of this run
    return 0


class _Cluster:
    def __init__(self, api):
        self.api = api


def _adapter(name: str, uri: str, digest: str, model: str) -> dict:
    base = {"uri": model, "revision": "v1"} if model == "builtin://tiny-llama" else {"uri": model}
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "LoRAAdapter",
            "metadata": {"name": name},
            "spec": {"baseModel": base,
                     "source": {"uri": uri, "sha256": digest}, "servingName": name,
                     "target": {"deployment": "srv"}}}


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
