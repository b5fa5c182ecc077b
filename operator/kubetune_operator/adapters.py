"""LoRAAdapter controller glue: observe (artifact, target Deployment, every ready serving pod's
/v1/models and its answer to the behaviour probe), ask the pure reconcile what to load or
unload, do it on every replica in parallel, observe again, write the status rebuilt from what
the replicas now say.

The Kubernetes side is read from caches, not the API: target Deployments and pods come from
watches (primed by a LIST), the source FineTuneJob from the FineTuneJob controller's cache,
Secrets are read once and again only when a server refuses the key (or after
SECRET_TTL_SECONDS). Every adapter with a target is still looked at every
`adapter_resync_seconds`, which costs calls to its serving pods and one S3 GET, no API request:
a replica that restarted and lost the adapter, or drifted, is found and repaired."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone

import structlog
from kubernetes.client.exceptions import ApiException

from kubetune import reasons
from kubetune.api.validation import SpecError, parse
from kubetune.behaviour import judge

from . import metrics, policy
from .cache import Key, ServingCache
from .engine import Engine, EngineError
from .kube import Kube
from .merged import MergedRollout
from .reconcile import loraadapter as rec
from .reconcile import merged as merged_rec
from .resources.finetunejob import LABEL_JOB, sealed_artifact
from .resources.loraadapter import LABEL_ADAPTER
from .runner import run_reconcile
from .settings import OperatorSettings
from .verification import Verifier
from .workqueue import WorkQueue

log = structlog.get_logger("kubetune.operator")
DEPLOYMENT_SELECTOR = f"{policy.TARGET_LABEL}=true"
SECRET_TTL_SECONDS = 600.0  # a Secret read is trusted this long (a refused key drops it at once)


def _target_of(body: dict) -> str | None:
    """The Deployment an adapter body targets (from the raw object; None without a target)."""
    return ((body.get("spec") or {}).get("target") or {}).get("deployment")


def _fan_out(fn, items: list) -> list:
    """fn over items, one thread each (at most 32), in a pool of this call's own: a replica
    that answers slowly delays only the adapter it serves, never another adapter's calls."""
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(len(items), 32), thread_name_prefix="kubetune-engine") as pool:
        return list(pool.map(fn, items))


class LoRAAdapterController:
    def __init__(self, kube: Kube, settings: OperatorSettings,
                 finetunejobs: dict[Key, dict] | None = None):
        self.kube = kube
        self.settings = settings
        self.serving = ServingCache()
        self.finetunejobs = finetunejobs if finetunejobs is not None else {}
        self._secrets: dict[Key, tuple[float, dict[str, str]]] = {}
        self.adapters: dict[Key, dict] = {}
        # namespace → adapter → the labels of the pods it serves from (pod events poke it)
        self.selectors: dict[str, dict[str, dict[str, str]]] = {}
        self.verifier = Verifier(settings.max_artifact_bytes)
        # (namespace, pod, serving name) → ((path, digest), verdict) of the behaviour probe.
        self.behaviour: dict[tuple[str, str, str], tuple[tuple[str, str | None], object]] = {}
        # Fair between namespaces: slow serving pods of one tenant hold at most its share.
        self.queue = WorkQueue(self.reconcile, settings.adapter_workers,
                               settings.adapter_workers_per_namespace, lane_of=lambda k: k[0],
                               name="kubetune-adapter")
        metrics.ADAPTER_QUEUE.set_function(self.queue.depth)
        self.merged = MergedRollout(kube, settings, self.serving)

    # ---- events ----------------------------------------------------------------------------
    def on_adapter(self, event_type: str, body: dict) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if event_type == "DELETED":
            self.adapters.pop(key, None)
            self._watch_pods(key, None)
            serving = (body.get("spec") or {}).get("servingName")
            for k in [k for k in self.behaviour if k[0] == key[0] and k[2] == serving]:
                self.behaviour.pop(k, None)
            metrics.observe_adapter(key, None)
        else:
            self.adapters[key] = body
            self.queue.add(key)
        self._poke_target(body)

    def prime(self, scopes: list[str | None], watched) -> None:
        """Fill the serving cache before the first reconcile (LIST, then the watches).
        `scopes`: namespaces to list (None: all); `watched(ns)`: whether ns is watched."""
        for ns in scopes:
            for obj in self.kube.list("Deployment", DEPLOYMENT_SELECTOR
                                      if self.settings.require_target_opt_in else "", ns):
                if watched(obj["metadata"]["namespace"]):
                    self.serving.put_deployment(obj)
            for obj in self.kube.list("Pod", f"!{LABEL_JOB}", ns):
                if watched(obj["metadata"]["namespace"]):
                    self.serving.put_pod(obj)
            for obj in self.kube.list("Job", LABEL_ADAPTER, ns):
                if watched(obj["metadata"]["namespace"]):
                    self.serving.put_job(obj)

    def on_deployment(self, event_type: str, body: dict) -> None:
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        if event_type == "DELETED":
            self.serving.remove_deployment(ns, name)
        else:
            self.serving.put_deployment(body)
        for key, other in list(self.adapters.items()):
            if key[0] == ns and _target_of(other) == name:
                self.queue.add(key, 0.2)

    def on_merge_job(self, event_type: str, job: dict) -> None:
        """A merge Job changed (running, done, failed): its adapter looks."""
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        if event_type == "DELETED":
            self.serving.remove_job(ns, name)
        else:
            self.serving.put_job(job)
        owner = (job["metadata"].get("labels") or {}).get(LABEL_ADAPTER)
        if owner and (ns, owner) in self.adapters:
            self.queue.add((ns, owner), 0.2)

    def on_finetunejob(self, body: dict) -> None:
        """A FineTuneJob changed (an artifact published, a gate passed): its adapters look."""
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        for key, other in list(self.adapters.items()):
            spec = other.get("spec") or {}
            source = ((spec.get("source") or {}).get("fromFineTuneJob") or {}).get("name") or \
                (other["metadata"].get("labels") or {}).get("kubetune.io/finetunejob")
            if key[0] == ns and source == name:
                self.queue.add(key, 0.1)

    def on_pod(self, event_type: str, pod: dict) -> None:
        if LABEL_JOB in (pod["metadata"].get("labels") or {}):
            return  # a training pod: never a serving pod nor a merge Job's (the cache skips it)
        ns = pod["metadata"]["namespace"]
        if event_type == "DELETED":
            self.serving.remove_pod(ns, pod["metadata"]["name"])
        else:
            self.serving.put_pod(pod)
        labels = pod["metadata"].get("labels") or {}
        for name, selector in list(self.selectors.get(ns, {}).items()):
            if selector and all(labels.get(k) == v for k, v in selector.items()):
                self.queue.add((ns, name), 0.2)  # a burst of pod updates becomes one look

    def _watch_pods(self, key: Key, selector: dict[str, str] | None) -> None:
        """Pod events matching `selector` queue the adapter `key` (None: no more)."""
        if selector:
            self.selectors.setdefault(key[0], {})[key[1]] = selector
        else:
            self.selectors.get(key[0], {}).pop(key[1], None)

    def _poke_target(self, body: dict) -> None:
        """Adapters on the same target Deployment look again: versions of an alias hand over
        to each other, and a merged adapter waits for the one holding the Deployment."""
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        mine = _target_of(body)
        if mine is None:
            return
        for key, other in list(self.adapters.items()):
            if key[0] == ns and key[1] != name and _target_of(other) == mine:
                self.queue.add(key, 0.1)

    # ---- reconcile -------------------------------------------------------------------------
    def reconcile(self, key: Key) -> None:
        if run_reconcile("LoRAAdapter", key, self.adapters.get(key), self._reconcile,
                         self.queue.retry) != "error":
            self.queue.forget(key)

    def _reconcile(self, key: Key, body: dict,
                   verified: rec.Verification | None = None) -> None:
        """`verified`: the artifact's final verdict, when a pass that loaded meanwhile found
        the operator's own file check failed (the pass is then done again with it)."""
        ns, name = key
        meta = body["metadata"]
        deleting = bool(meta.get("deletionTimestamp"))
        now = datetime.now(timezone.utc)
        errors: list[str] = []
        adapter = None
        try:
            adapter = parse({k: body.get(k) for k in ("apiVersion", "kind", "metadata", "spec")})
        except SpecError as exc:
            errors = exc.errors
        if adapter is None:
            if deleting:
                self._drop_finalizer(body)
            else:
                self._write(body, rec.status(rec.StatusInputs(body, None, errors, None, None,
                                                              None, None, None, None), now))
            return
        spec = adapter.spec
        if spec.target is not None and not deleting and \
                rec.FINALIZER not in (meta.get("finalizers") or []):
            finalizers = [*(meta.get("finalizers") or []), rec.FINALIZER]
            version = self.kube.patch(body, {"metadata": {"finalizers": finalizers}})
            meta.update(finalizers=finalizers, resourceVersion=version)  # our own write
        source = self._source_job(ns, body, adapter)
        v, pending = (verified, None) if verified is not None else \
            self._verify(ns, adapter, source)
        if pending is not None and (deleting or spec.target is None or
                                    rec.resolve_mode(adapter, v.method) != "HotSwap"):
            v, pending = pending.result(), None  # only hot-swap loads while the files are read
        compat = rec.compatibility(adapter, v) if v.ok else None
        promoted = rec.gates(adapter, (body.get("status") or {}).get("conditions") or [], source)
        mode = rec.resolve_mode(adapter, v.method) if v.ok else \
            (spec.mode if spec.mode != "Auto" else None)
        eligible = v.ok and (compat[0] or not spec.compatibility.enforce) and promoted[0]
        inputs = rec.StatusInputs(body, adapter, [], v, compat, promoted, mode, None, None)

        if spec.target is None:
            if deleting:
                self._drop_finalizer(body)
            else:
                self._write(body, rec.status(inputs, now))
            return
        if mode == "Merged":
            self._merged(key, body, adapter, v, eligible, inputs, deleting, now)
            return
        self._hot_swap(key, body, adapter, v, eligible, inputs, deleting, now, pending)

    def _merged(self, key: Key, body: dict, adapter, v: rec.Verification, eligible: bool,
                inputs: rec.StatusInputs, deleting: bool, now: datetime) -> None:
        """Observe (caches, the merged model's manifest in S3) → plan (pure) → act. Events on
        the Deployment, its pods and the merge Job bring the adapter back; ACTIVE_RECHECK is
        only a safety net while merging or rolling out."""
        ns = key[0]
        decision = rec.decide(body, eligible, self._members(ns, body))
        deployment = self._deployment(ns, adapter.spec.target.deployment)
        selector = ((deployment or {}).get("spec") or {}).get("selector") or {}
        self._watch_pods(key, selector.get("matchLabels"))  # its pods' events poke it
        try:
            storage = None if deleting or not v.ok else self._storage(ns, adapter)
        except Exception:  # noqa: BLE001 - verification already reported the Secret
            storage = None
        world = self.merged.observe(body, adapter, v, decision, deleting, deployment,
                                    storage=storage, rivals=self._rivals(ns, body))
        plan = merged_rec.plan(world)
        self.merged.act(body, adapter, v, world, plan)
        if deleting:
            if plan.finalized:
                self._drop_finalizer(body)
                self.merged.forget(v.uri)
            else:
                self.queue.add(key, 1)
            return
        inputs.merged = plan.state
        self._write(body, rec.status(inputs, now))
        self.queue.add(key, merged_rec.ACTIVE_RECHECK if plan.active or plan.patch else
                       self.settings.adapter_resync_seconds)

    def _hot_swap(self, key: Key, body: dict, adapter, v: rec.Verification, eligible: bool,
                  inputs: rec.StatusInputs, deleting: bool, now: datetime,
                  pending: Future | None = None) -> None:
        """`pending`: the operator's own check of the artifact's files, still running: the
        replicas load (pinned to the manifest's digest, which they check every file against)
        meanwhile, and nothing is written until it has ended; if it failed, the pass is done
        again with its verdict (unloading what was loaded)."""
        def settled() -> bool:
            """Wait for the file check; False when it failed and the pass was redone."""
            nonlocal pending
            if pending is None:
                return True
            final, pending = pending.result(), None
            if not final.ok:
                log.warning("The artifact failed the operator's file check after its "
                            "manifest passed", namespace=key[0], name=key[1],
                            reason=final.reason)
                self._reconcile(key, body, verified=final)
                return False
            inputs.verification = final
            return True

        ns, name = key
        spec = adapter.spec
        target = spec.target
        api_key = None
        if target.api_key_secret:
            try:
                api_key = self._secret(ns, target.api_key_secret.name).get("API_KEY")
            except ApiException as exc:
                if exc.status != 404:
                    raise
                message = f"Secret {target.api_key_secret.name} (spec.target.apiKeySecret) " \
                          f"not found in {ns}"
                if not deleting:
                    inputs.target_error = ("ApiKeySecretMissing", message)
                    if settled():
                        self._write(body, rec.status(inputs, now))
                    self.queue.add(key, self.settings.adapter_resync_seconds)
                    return
                # Deleting (often the whole namespace, the Secret first): unload where the
                # servers still answer without the key, and never hold the deletion hostage.
                self.kube.event(body, "Warning", "ApiKeySecretMissing",
                                f"{message}; unloading without a key where possible")
        moved_from = (body.get("status") or {}).get("servedTarget")
        left_behind = moved_from if moved_from and moved_from != target.deployment and \
            not self._unload_from(body, ns, moved_from, adapter, api_key) else None
        deployment = self._deployment(ns, target.deployment)
        if deployment is not None and not policy.target_opted_in(deployment, self.settings):
            if deleting:  # never loaded there (nothing is done to a Deployment not opted in)
                self._drop_finalizer(body)
                return
            inputs.target_error = ("TargetNotOptedIn",
                                   policy.not_opted_in_message(target.deployment, ns))
            self._watch_pods(key, None)
            if settled():
                self._write(body, rec.status(inputs, now))
            self.queue.add(key, self.settings.adapter_resync_seconds)
            return
        if deployment is None:
            if deleting:
                self._drop_finalizer(body)
                return
            inputs.target_error = ("TargetNotFound", f"deployment {target.deployment} not found "
                                                     f"in {ns}")
            self._watch_pods(key, None)
            if settled():
                self._write(body, rec.status(inputs, now))
            self.queue.add(key, self.settings.adapter_resync_seconds)
            return
        selector = (target.selector.match_labels if target.selector else
                    ((deployment.get("spec") or {}).get("selector") or {}).get("matchLabels")
                    or {})
        self._watch_pods(key, selector)
        pods = self.serving.ready_pods(ns, selector)
        # Desired: every replica the Deployment wants (a starting replica lacks the adapter
        # until it is ready and loaded), or more while a rollout surges.
        wanted = max(int((deployment.get("spec") or {}).get("replicas", 1) or 0), len(pods))
        decision = rec.keep_through_transient(
            rec.decide(body, eligible, self._members(ns, body)), v, deleting)
        path = rec.lora_path(adapter, v, self.settings.vllm_adapter_dir) if v.ok else ""
        inputs.decision, inputs.path = decision, path

        engines = self._engines(pods, target.port, api_key)
        replicas = self._observe(engines)
        load, unload, replace = rec.actions(replicas, spec.serving_name, path, decision.want)
        errors: dict[str, rec.Failure] = {}
        sync = (target.sync_port, v.uri, v.digest) if target.runtime == "vllm" else None
        acted = self._act(engines, spec.serving_name, path, load, unload, replace, errors, sync)
        if acted:
            fresh = {r.pod: r for r in self._observe({p: engines[p] for p in acted})}
            replicas = [fresh.get(r.pod, r) for r in replicas]
        if spec.compatibility.verify_behaviour and v.ok and v.probe is not None and path:
            self._check_behaviour(body, engines, replicas, acted, spec, v, path, errors)
        if not settled():
            return
        if target.api_key_secret and (
                any(r.error_reason == reasons.UNAUTHORIZED for r in replicas) or
                any(f.reason == reasons.UNAUTHORIZED for f in errors.values())):
            self._secrets.pop((ns, target.api_key_secret.name), None)  # read it again
        inputs.replicas = replicas
        inputs.desired = wanted
        inputs.failures = rec.failures_for(replicas, spec.serving_name, path, decision.want,
                                           errors, spec.base_model.uri, target.runtime) \
            if decision.want == "load" else [f for f in errors.values()]
        out = rec.hot_swap_outcome(inputs, rec.Acted([r.pod for r in load + replace],
                                                     [r.pod for r in unload]),
                                   errors, deleting, left_behind,
                                   self.settings.adapter_resync_seconds, now)
        for kind, reason, message in out.events:
            self.kube.event(body, kind, reason, message)
        if deleting:
            if out.release:
                self._drop_finalizer(body)
                metrics.observe_adapter(key, None)
            else:
                self.queue.add(key, out.requeue_after)
            return
        metrics.observe_adapter(key, (ns, target.deployment, out.status.get("replicas") or {}))
        self._write(body, out.status)
        self.queue.add(key, out.requeue_after)

    def _check_behaviour(self, body: dict, engines: dict[str, Engine],
                         replicas: list[rec.Replica], acted: set[str], spec,
                         v: rec.Verification, path: str, errors: dict) -> None:
        """Ask every replica that lists the adapter for the manifest's probe, once per load:
        the verdict is kept per (pod, adapter, digest) until the operator loads it there again.
        A replica that answers like the base model (or anything else) is `mismatch`."""
        ns, name = body["metadata"]["namespace"], spec.serving_name
        serving = [r for r in replicas if r.models is not None and r.models.get(name) == path]
        for pod in acted:
            self.behaviour.pop((ns, pod, name), None)
        live = {r.pod for r in replicas}
        for key in [k for k in self.behaviour if k[0] == ns and k[2] == name and
                    k[1] not in live]:
            self.behaviour.pop(key, None)  # pods that are gone

        def ask(replica: rec.Replica):
            known = self.behaviour.get((ns, replica.pod, name))
            if known is not None and known[0] == (path, v.digest):
                return replica, known[1], None
            try:
                got = engines[replica.pod].probe(name, v.probe.text, len(v.probe.adapter))
            except EngineError as exc:
                return replica, None, exc
            return replica, judge(v.probe, got, spec.compatibility.probe_tolerance), None

        for replica, verdict, exc in _fan_out(ask, serving):
            if exc is not None:
                replica.behaviour = "unknown"
                errors[replica.pod] = rec.Failure(replica.pod, exc.reason,
                                                  f"behaviour probe: {exc}")
                continue
            replica.behaviour = "ok" if verdict.ok else "mismatch"
            replica.behaviour_message = verdict.message
            known = self.behaviour.get((ns, replica.pod, name))
            if known is None or known[0] != (path, v.digest):  # a new verdict
                self.behaviour[(ns, replica.pod, name)] = ((path, v.digest), verdict)
                self.kube.event(body, "Normal" if verdict.ok else "Warning",
                                "BehaviourVerified" if verdict.ok else "BehaviourMismatch",
                                f"pod {replica.pod}: {verdict.message}")
                metrics.BEHAVIOUR_CHECKS.labels(result="ok" if verdict.ok else
                                                "mismatch").inc()

    def _unload_from(self, body: dict, ns: str, deployment_name: str, adapter, api_key) -> bool:
        """spec.target changed (promotion to another Deployment): unload from the old one.
        True when no reachable replica there serves it any more."""
        old = self._deployment(ns, deployment_name)
        if old is None:
            return True
        selector = ((old.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        pods = self.serving.ready_pods(ns, selector)
        engines = self._engines(pods, adapter.spec.target.port, api_key)
        replicas = self._observe(engines)
        _, unload, _ = rec.actions(replicas, adapter.spec.serving_name, "", "unload")
        errors: dict[str, rec.Failure] = {}
        self._act(engines, adapter.spec.serving_name, "", [], unload, [], errors)
        for r in unload:
            if r.pod not in errors:
                self.kube.event(body, "Normal", "UnloadedFromReplica",
                                f"Unloaded {adapter.spec.serving_name} from pod {r.pod} of "
                                f"{deployment_name} (spec.target is now "
                                f"{adapter.spec.target.deployment})")
        return not errors

    # ---- replicas --------------------------------------------------------------------------
    def _engines(self, pods: list[dict], port: int, api_key: str | None) -> dict[str, Engine]:
        """The serving API of each ready pod, by pod name."""
        return {p["metadata"]["name"]: Engine(p["status"]["podIP"], port, api_key,
                                              load_timeout=self.settings.
                                              engine_load_timeout_seconds) for p in pods}

    def _observe(self, engines: dict[str, Engine]) -> list[rec.Replica]:
        def one(item):
            pod, engine = item
            try:
                models, base = engine.models()
                return rec.Replica(pod, engine.base, models, base)
            except EngineError as exc:
                return rec.Replica(pod, engine.base, None, None, str(exc),
                                   error_reason=exc.reason)
        return _fan_out(one, sorted(engines.items()))

    def _act(self, engines, name, path, load, unload, replace, errors, sync=None) -> set[str]:
        """Load/unload on replicas in parallel. `sync` (port, uri, digest): vLLM pods get the
        files from their adapter-sync sidecar first."""
        def do(item):
            kind, replica = item
            engine = engines[replica.pod]
            try:
                if kind in ("load", "replace") and sync is not None:
                    engine.sync(sync[0], sync[1], sync[2], path)
                if kind in ("unload", "replace"):
                    engine.unload(name)
                if kind in ("load", "replace"):
                    engine.load(name, path)
            except EngineError as exc:
                errors[replica.pod] = rec.Failure(replica.pod, exc.reason, str(exc))
        work = [("load", r) for r in load] + [("unload", r) for r in unload] + \
            [("replace", r) for r in replace]
        _fan_out(do, work)
        return {r.pod for _, r in work}

    # ---- helpers ---------------------------------------------------------------------------
    def _members(self, ns: str, body: dict) -> list[dict]:
        """The other versions of this adapter's alias on the same target."""
        return [b for k, b in list(self.adapters.items()) if k[0] == ns and
                rec.same_group(body, b)]

    def _rivals(self, ns: str, body: dict) -> frozenset[str]:
        """Other adapters on the same target Deployment that are not versions of this alias."""
        mine = _target_of(body)
        return frozenset(
            b["metadata"]["name"] for k, b in list(self.adapters.items())
            if k[0] == ns and k[1] != body["metadata"]["name"] and _target_of(b) == mine
            and not rec.same_group(body, b))  # one being deleted holds it until restored

    def _source_job(self, ns: str, body: dict, adapter) -> dict | None:
        ref = adapter.spec.source.from_fine_tune_job
        name = ref.name if ref else (body["metadata"].get("labels") or {}).get(
            "kubetune.io/finetunejob")
        if not name:
            return None
        cached = self.finetunejobs.get((ns, name))  # the FineTuneJob controller's watch cache
        return cached if cached is not None else self.kube.get_custom("FineTuneJob", ns, name)

    def _deployment(self, ns: str, name: str) -> dict | None:
        """The target from the watch cache; a miss is asked of the API (the watch holds only
        opted-in Deployments, so a miss may be one that is not: the status says which)."""
        cached = self.serving.deployment(ns, name)
        return cached if cached is not None else self.kube.get_deployment(ns, name)

    def _secret(self, ns: str, name: str) -> dict[str, str]:
        import time

        held = self._secrets.get((ns, name))
        if held is not None and time.monotonic() - held[0] < SECRET_TTL_SECONDS:
            return held[1]
        data = self.kube.secret_data(ns, name)
        self._secrets[(ns, name)] = (time.monotonic(), data)
        return data

    def _storage(self, ns: str, adapter):
        from kubetune.storage import shared

        src = adapter.spec.source
        secret = src.credentials_secret.name if src.credentials_secret else \
            self.settings.s3_credentials_secret
        keys = {}
        if secret:
            data = self._secret(ns, secret)
            keys = {"access_key": data.get("AWS_ACCESS_KEY_ID"),
                    "secret_key": data.get("AWS_SECRET_ACCESS_KEY")}
        return shared(src.endpoint or self.settings.s3_endpoint, self.settings.s3_region,
                      retries=2, deadline=self.settings.s3_deadline_seconds, **keys)

    def _verify(self, ns: str, adapter, source: dict | None
                ) -> tuple[rec.Verification, Future | None]:
        """The artifact's verdict, or what its manifest says and the file check running
        (Verifier.begin)."""
        src = adapter.spec.source
        uri, expected = src.uri, src.sha256
        if src.from_fine_tune_job is not None:
            if source is None:
                return rec.Verification(False, "SourceNotReady", f"FineTuneJob "
                                        f"{src.from_fine_tune_job.name} not found"), None
            artifact = sealed_artifact(source)
            if not artifact:
                return rec.Verification(False, "SourceNotReady", f"FineTuneJob "
                                        f"{src.from_fine_tune_job.name} has not published an "
                                        f"artifact yet"), None
            uri, expected = artifact["uri"], expected or artifact.get("manifestSha256")
        if not policy.endpoint_allowed(src.endpoint, self.settings):
            return rec.Verification(False, "PolicyDenied", f"spec.source.endpoint: "
                                    f"{src.endpoint} is not allowed by the operator's policy "
                                    f"(chart value policy.allowedS3Endpoints)", uri), None
        try:
            storage = self._storage(ns, adapter)
        except Exception as exc:  # noqa: BLE001 - a missing Secret is a status, not a crash
            return rec.Verification(False, "StorageError", f"S3 credentials: {exc}", uri), None
        return self.verifier.begin(uri, expected, storage)

    def _write(self, body: dict, status: dict) -> None:
        old = body.get("status") or {}
        if status == old:
            return
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        # Fields that no longer apply are removed (a merge patch with null).
        patch = {**{k: None for k in old if k not in status}, **status}
        # Conditions are one list: a write based on an older object would drop a condition
        # someone else (an evaluation gate) just added, so the write is conditional.
        if not self.kube.patch_status("LoRAAdapter", ns, name, patch,
                                      body["metadata"].get("resourceVersion")):
            self.queue.add((ns, name), 0.2)  # the newer object's event brings it back
            return
        self._events(body, old, status)
        body["status"] = status
        self._poke_target(body)

    def _events(self, body: dict, old: dict, new: dict) -> None:
        before = {c["type"]: c for c in old.get("conditions") or []}
        for c in new.get("conditions") or []:
            prev = before.get(c["type"])
            if c["type"] not in ("ArtifactVerified", "Compatible", "Loaded", "RolledOut",
                                 "Degraded"):
                continue
            if prev and (prev.get("status"), prev.get("reason")) == (c["status"], c["reason"]):
                continue
            if c["type"] == "Degraded" and c["status"] != "True" and not prev:
                continue
            bad = (c["status"] == "False" and c["type"] != "Degraded" and
                   reasons.warns(c["reason"])) or \
                (c["type"] == "Degraded" and c["status"] == "True")
            text = f"{c['type']}={c['status']} ({c['reason']})" + \
                (f": {c['message']}" if c.get("message") else "")
            self.kube.event(body, "Warning" if bad else "Normal", c["reason"], text)

    def _drop_finalizer(self, body: dict) -> None:
        finalizers = body["metadata"].get("finalizers") or []
        if rec.FINALIZER in finalizers:
            self.kube.patch(body, {"metadata": {"finalizers": [
                f for f in finalizers if f != rec.FINALIZER]}})
            log.info("Unloaded everywhere; released", namespace=body["metadata"]["namespace"],
                     name=body["metadata"]["name"])
