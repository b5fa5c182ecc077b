"""GitOps with the real Flux (source-controller + kustomize-controller, built from their Go
modules) reading a Git repository over HTTP: a FineTuneJob and a LoRAAdapter of alias
`assistant` come from Git; a commit that adds v2 is served make-before-break on every
replica; `git revert` of it brings v1 back first; the Kustomization (`wait: true`) is Ready
only once our objects are (kstatus reads our conditions and observedGeneration), and reports
the adapter that cannot load as soon as it fails."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from adapterfactory import published
from helpers import wait_for
from kubetune.devcluster.cluster import DevCluster
from kubetune.storage import Storage
from servingutil import adapter, condition, create_deployment, models, serve_deployment, \
    wait_ready
from test_adapter_promotion import AliasPoller

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.trainer]
SOURCE = ("source.toolkit.fluxcd.io", "v1", "gitrepositories")
KUSTOMIZE = ("kustomize.toolkit.fluxcd.io", "v1", "kustomizations")


@pytest.fixture(scope="module")
def flux(cluster):
    """Flux and the Git server on the session's cluster (stopped with the cluster)."""
    dev = DevCluster(cluster.dir)
    return dev, dev.start_flux(progress=print)


class Repo:
    """A working copy pushed (over the file system) to a bare repository the Git server
    serves; Flux only ever reads it over HTTP."""

    def __init__(self, work: Path, bare: Path):
        self.work, self.bare = work, bare
        work.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", "main")
        self.git("config", "user.email", "ci@kubetune.dev")
        self.git("config", "user.name", "kubetune CI")

    def git(self, *args: str) -> str:
        return subprocess.run(["git", "-C", str(self.work), *args], check=True,
                              capture_output=True, text=True).stdout.strip()

    def commit(self, message: str, files: dict[str, dict | None]) -> str:
        for name, obj in files.items():
            path = self.work / "apps" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if obj is None:
                path.unlink()
            else:
                path.write_text(yaml.safe_dump(obj))
        resources = sorted(p.name for p in (self.work / "apps").glob("*.yaml")
                           if p.name != "kustomization.yaml")
        (self.work / "apps" / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": resources}))
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        return self.push()

    def revert(self) -> str:
        self.git("revert", "--no-edit", "HEAD")
        return self.push()

    def push(self) -> str:
        self.git("push", "-q", str(self.bare), "main")
        return self.git("rev-parse", "HEAD")


def _adapter(name: str, uri: str) -> dict:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "LoRAAdapter",
            "metadata": {"name": name},
            "spec": {"baseModel": {"uri": "builtin://tiny-llama", "revision": "v1"},
                     "source": {"uri": uri}, "servingName": name, "alias": "assistant",
                     "stage": "production", "target": {"deployment": "srv"}}}


def _finetunejob(name: str) -> dict:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name},
            "spec": {"baseModel": {"uri": "builtin://tiny-llama", "revision": "v1"},
                     "dataset": {"train": {"uri": "builtin://tiny-chat"}, "format": "messages",
                                 "maxLength": 128},
                     "method": {"type": "LoRA", "lora": {"r": 8}},
                     "training": {"maxSteps": 30, "learningRate": 0.003,
                                  "perDeviceBatchSize": 8, "loggingSteps": 5},
                     "resources": {"gpusPerNode": 1,
                                   "nodeSelector": {"kubetune.io/real-node": "true"}},
                     "output": {"uri": f"s3://kubetune/gitops/{name}-{int(time.time())}"}}}


def _kustomization(cluster, ns: str) -> dict:
    return client.CustomObjectsApi(cluster.api).get_namespaced_custom_object(
        KUSTOMIZE[0], KUSTOMIZE[1], ns, KUSTOMIZE[2], "apps")


def _ks_ready(cluster, ns: str, revision: str | None = None) -> dict | None:
    ks = _kustomization(cluster, ns)
    ready = condition(ks, "Ready")
    if ready.get("status") == "True" and (revision is None or revision in (
            ks.get("status") or {}).get("lastAppliedRevision", "")) and \
            ready.get("observedGeneration") == ks["metadata"]["generation"]:
        return ks
    return None


def _reconcile_now(cluster, ns: str) -> None:
    """What `flux reconcile source git` (or a webhook Receiver) does: ask for a fetch now
    instead of at the next interval."""
    cluster.kubectl("annotate", "-n", ns, "gitrepository", "apps", "--overwrite",
                    f"reconcile.fluxcd.io/requestedAt={time.time_ns()}")


def _served(cluster, ns, name, ips, names) -> bool:
    a = adapter(cluster, ns, name)
    return condition(a, "Ready").get("status") == "True" and \
        all(models(ip) & names == {name} for ip in ips)


def test_flux_applies_promotes_reverts_and_reports_a_failed_adapter(
        cluster, operator, job_namespace, s3_server, flux, tmp_path):
    dev, git_url = flux
    ns = job_namespace
    storage = Storage(s3_server.endpoint, access_key=s3_server.access_key,
                      secret_key=s3_server.secret_key)
    create_deployment(cluster, ns, serve_deployment("srv", 2, endpoint=s3_server.endpoint))
    ips = [p["ip"] for p in wait_ready(cluster, ns, "srv", 2)]
    uri1, _ = published(storage, s3_server.bucket, tmp_path, "LoRA", seed=1)
    uri2, _ = published(storage, s3_server.bucket, tmp_path, "LoRA", seed=2)
    bad_uri, _ = published(storage, s3_server.bucket, tmp_path, "LoRA", seed=3)
    key = bad_uri.removeprefix(f"s3://{s3_server.bucket}/") + "/adapter_model.safetensors"
    data = bytearray(storage.s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01  # one byte changed, same size: DigestMismatch
    storage.s3.put_object(Bucket=s3_server.bucket, Key=key, Body=bytes(data))

    repo = Repo(tmp_path / "work", dev.flux().create_repository(ns))
    first = repo.commit("assistant v1 and the job that trains it", {
        "tune.yaml": _finetunejob("tune"), "assistant-v1.yaml": _adapter("assistant-v1", uri1)})
    custom = client.CustomObjectsApi(cluster.api)
    custom.create_namespaced_custom_object(SOURCE[0], SOURCE[1], ns, SOURCE[2], {
        "apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
        "metadata": {"name": "apps"},
        "spec": {"interval": "1m", "timeout": "30s", "url": f"{git_url}/{ns}.git",
                 "ref": {"branch": "main"}}})
    t0 = time.monotonic()
    custom.create_namespaced_custom_object(KUSTOMIZE[0], KUSTOMIZE[1], ns, KUSTOMIZE[2], {
        "apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
        "metadata": {"name": "apps"},
        "spec": {"interval": "1m", "retryInterval": "5s", "timeout": "4m", "path": "./apps",
                 "prune": True, "wait": True, "targetNamespace": ns,
                 "sourceRef": {"kind": "GitRepository", "name": "apps"}}})

    # wait: true — Ready only once the FineTuneJob has succeeded and v1 serves everywhere.
    seen_early = []

    def ready_first():
        ks = _ks_ready(cluster, ns, first)
        job = custom.get_namespaced_custom_object("kubetune.io", "v1alpha1", ns,
                                                  "finetunejobs", "tune")
        if not ks:
            seen_early.append((job.get("status") or {}).get("phase"))
            return None
        return ks, job
    ks, job = wait_for(ready_first, timeout=420, interval=1,
                       message="Kustomization Ready at the first commit")
    applied = time.monotonic() - t0
    assert job["status"]["phase"] == "Succeeded", job["status"]
    assert any(p in ("Pending", "Running", None) for p in seen_early), seen_early
    assert condition(ks, "Ready")["reason"] == "ReconciliationSucceeded"
    assert condition(adapter(cluster, ns, "assistant-v1"), "Ready")["status"] == "True"
    assert all(models(ip) & {"assistant-v1"} == {"assistant-v1"} for ip in ips)

    # Promotion: a commit adds v2; Flux applies it; every replica serves v2 before v1 goes.
    names = {"assistant-v1", "assistant-v2"}
    poller = AliasPoller(ips, names)
    time.sleep(1)
    second = repo.commit("promote assistant v2", {
        "assistant-v2.yaml": _adapter("assistant-v2", uri2)})
    t1 = time.monotonic()
    _reconcile_now(cluster, ns)
    wait_for(lambda: _ks_ready(cluster, ns, second) and
             _served(cluster, ns, "assistant-v2", ips, names), timeout=180,
             message="v2 served and the Kustomization Ready at the second commit")
    promoted = time.monotonic() - t1
    v1 = adapter(cluster, ns, "assistant-v1")
    assert condition(v1, "Ready")["reason"] == "Superseded"

    # Revert in Git: Flux prunes v2; v1 is loaded again before v2 is unloaded.
    third = repo.revert()
    t2 = time.monotonic()
    _reconcile_now(cluster, ns)
    wait_for(lambda: _ks_ready(cluster, ns, third) and
             _served(cluster, ns, "assistant-v1", ips, names) and
             not [a for a in custom.list_namespaced_custom_object(
                 "kubetune.io", "v1alpha1", ns, "loraadapters")["items"]
                 if a["metadata"]["name"] == "assistant-v2"],
             timeout=180, message="v1 served again and v2 pruned")
    reverted = time.monotonic() - t2
    time.sleep(1)
    poller.stop()
    for ip in ips:
        seen = [s for i, s in poller.snapshots if i == ip]
        assert len(seen) > 20, f"too few polls of {ip}: {len(seen)}"
        assert all(seen), f"{ip} served no version of the alias at some moment"
        both = seen.index(frozenset(names))
        assert both < seen.index(frozenset({"assistant-v2"}))  # v2 loaded before v1 left
        after = seen[seen.index(frozenset({"assistant-v2"})):]
        assert frozenset(names) in after and after[-1] == frozenset({"assistant-v1"})

    # A version that cannot load (its artifact corrupt): the Kustomization fails at once
    # (Stalled=True reads as Failed), naming it, and v1 keeps serving.
    fourth = repo.commit("assistant v3 (corrupt)", {
        "assistant-v3.yaml": _adapter("assistant-v3", bad_uri)})
    t3 = time.monotonic()
    _reconcile_now(cluster, ns)

    def failed():
        ks = _kustomization(cluster, ns)
        ready = condition(ks, "Ready")
        return ready.get("status") == "False" and ready.get("reason") == "HealthCheckFailed" \
            and fourth in str((ks.get("status") or {}).get("lastAttemptedRevision")) and ks
    ks = wait_for(failed, timeout=120, message="the Kustomization reports the failed adapter")
    reported = time.monotonic() - t3
    message = condition(ks, "Ready")["message"]
    assert "LoRAAdapter" in message and "assistant-v3" in message, message
    assert reported < 60, f"reported after {reported:.0f}s: not fail-fast (timeout is 4m)"
    v3 = adapter(cluster, ns, "assistant-v3")
    assert condition(v3, "Stalled")["status"] == "True"
    assert condition(v3, "ArtifactVerified")["reason"] == "DigestMismatch"
    assert all(models(ip) & {"assistant-v1", "assistant-v3"} == {"assistant-v1"} for ip in ips)
    print(f"\nFlux timeline: first commit Ready (job trained, v1 served) {applied:.1f}s; "
          f"promotion to v2 served {promoted:.1f}s; revert to v1 {reverted:.1f}s; "
          f"failed v3 reported {reported:.1f}s")
