"""Experiment tracking with MLflow, over its REST API (``/api/2.0/mlflow``) with urllib.

Why REST and not the ``mlflow`` client: the trainer image carries torch and nothing it does not
need; the client (even mlflow-skinny) brings a dozen packages and its own retry loops with their
own deadlines, and pins versions (pyarrow) that clash with ours. Six endpoints cover a run:
experiment by name or create, run search / create / update, log-batch.

Tracking is best effort and never fails training: every request has a deadline, the start and
the end have a total budget each, per-step metrics are sent off the training thread, and after
a few failures in a row the tracker stops trying. What happened goes into the termination
summary (``tracking.state``: Logged, Degraded or Failed), and from there into the FineTuneJob's
status. Every attempt of one FineTuneJob logs to one run, found again by its
``kubetune.job-uid`` tag, so a resumed attempt continues the same metric history.
"""

from __future__ import annotations

import base64
import json
import math
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from kubetune.trainerconfig import TrackingConfig, TrainerConfig

API = "/api/2.0/mlflow"
MAX_RESPONSE_BYTES = 1 << 20  # a search answer of one run is a few KiB
MAX_PARAM_VALUE = 500  # the smallest limit MLflow servers have enforced (newer: 6000)
MAX_TAG_VALUE = 5000
METRICS_PER_BATCH = 1000  # MLflow's log-batch limits
PARAMS_PER_BATCH = 100
MAX_QUEUED_POINTS = 20_000  # per-step points waiting to be sent (oldest dropped beyond)
FAILURES_BEFORE_GIVING_UP = 3
STEP_METRICS = ("loss", "eval_loss", "learning_rate", "tokens_per_second", "epoch")
FINAL_METRICS = ("trainLoss", "evalLoss", "exactMatch", "normalizedMatch", "scoreSamples",
                 "baseExactMatch", "baseNormalizedMatch", "steps", "tokensPerSecond",
                 "trainRuntimeSeconds", "numTokens")
TAG_UID, TAG_ATTEMPT = "kubetune.job-uid", "kubetune.attempt"


class TrackingError(Exception):
    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an error: urllib would resend the Authorization header to wherever it
    points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise TrackingError(f"the tracking server redirected to {newurl[:200]} (refused: the "
                            f"credentials would follow; set trackingUri to the final URL)")


def auth_header(env=os.environ) -> str | None:
    """MLflow's own variables: a bearer token, or a user and password (basic auth)."""
    if env.get("MLFLOW_TRACKING_TOKEN"):
        return f"Bearer {env['MLFLOW_TRACKING_TOKEN']}"
    user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
    if user and password is not None:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return None


class Client:
    """One MLflow server's REST API: JSON in and out, each call within a deadline."""

    def __init__(self, base_url: str, timeout: float, env=os.environ):
        self.base = base_url.rstrip("/")
        self.timeout = timeout
        self.auth = auth_header(env)
        self.opener = urllib.request.build_opener(_NoRedirect)

    def call(self, method: str, endpoint: str, body: dict | None = None,
             query: dict | None = None, deadline: float | None = None) -> dict:
        """`deadline` (time.monotonic()) bounds the call: the request's timeout is what is
        left of it, and reading the answer stops once it has passed."""
        left = self.timeout if deadline is None else min(self.timeout,
                                                         deadline - time.monotonic())
        if left <= 0:
            raise TrackingError(f"{endpoint}: no time left (tracking budget spent)")
        url = f"{self.base}{API}/{endpoint}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.auth:
            headers["Authorization"] = self.auth
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        end = time.monotonic() + left
        try:
            with self.opener.open(request, timeout=left) as response:
                return _json(_read(response, end), endpoint)
        except urllib.error.HTTPError as exc:
            raise _http_error(exc, endpoint) from None
        except TrackingError:
            raise
        except (OSError, ValueError) as exc:  # refused, reset, timed out, bad URL
            raise TrackingError(f"{endpoint}: {type(exc).__name__}: {exc}") from None


def _read(response, end: float) -> bytes:
    chunks, size = [], 0
    while True:
        if time.monotonic() > end:
            raise TrackingError("the tracking server's answer took longer than its deadline")
        chunk = response.read(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise TrackingError(f"the tracking server's answer exceeds {MAX_RESPONSE_BYTES} "
                                f"bytes")
        chunks.append(chunk)


def _json(raw: bytes, endpoint: str) -> dict:
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        raise TrackingError(f"{endpoint}: the answer is not JSON: {raw[:120]!r}") from None
    if not isinstance(data, dict):
        raise TrackingError(f"{endpoint}: the answer is not a JSON object")
    return data


def _http_error(exc: urllib.error.HTTPError, endpoint: str) -> TrackingError:
    try:
        data = json.loads(exc.read(65536) or b"{}")
    except (ValueError, OSError):
        data = {}
    data = data if isinstance(data, dict) else {}
    code = data.get("error_code") if isinstance(data.get("error_code"), str) else None
    text = str(data.get("message") or exc.reason)[:300]
    return TrackingError(f"{endpoint}: HTTP {exc.code} {code or ''}: {text}".replace("  ", " "),
                         code)


# ---- what is logged --------------------------------------------------------------------------
def params(cfg: TrainerConfig, dataset_sha256: str | None, trainable: int | None) -> dict:
    """The run's parameters: what was trained, on what, how (flat strings, bounded)."""
    t = cfg.training
    out = {"method": cfg.method.type,
           "method.config": json.dumps(cfg.method.model_dump(mode="json", by_alias=True,
                                                             exclude_none=True), sort_keys=True),
           "base_model.uri": cfg.model.uri, "base_model.revision": cfg.model.revision,
           "dataset.uri": cfg.data.train.uri, "dataset.sha256": dataset_sha256,
           "dataset.eval_uri": cfg.data.eval.uri if cfg.data.eval else None,
           "dataset.format": cfg.data.format, "dataset.max_length": cfg.data.max_length,
           "dataset.packing": cfg.data.packing, "learning_rate": cfg.learning_rate,
           "epochs": t.epochs, "max_steps": t.max_steps, "lr_scheduler": t.lr_scheduler,
           "warmup_ratio": t.warmup_ratio, "warmup_steps": t.warmup_steps,
           "per_device_batch_size": t.per_device_batch_size,
           "gradient_accumulation_steps": t.gradient_accumulation_steps,
           "optimizer": t.optimizer, "weight_decay": t.weight_decay,
           "max_grad_norm": t.max_grad_norm, "precision": t.precision, "seed": t.seed,
           "gradient_checkpointing": cfg.gradient_checkpointing,
           "world_size": int(os.environ.get("WORLD_SIZE", "1")),
           "trainable_parameters": trainable, "output.uri": cfg.output.uri}
    return {k: str(v)[:MAX_PARAM_VALUE] for k, v in out.items() if v is not None}


def step_points(event: dict, now_ms: int) -> list[dict]:
    """The metric points of one progress event (the eval loss only when it was measured)."""
    if event.get("event") != "progress" or event.get("final") or \
            type(event.get("step")) is not int:
        return []
    points = []
    for key in STEP_METRICS:
        if key == "eval_loss" and not event.get("evaluated"):
            continue
        value = _number(event.get(key))
        if value is not None:
            points.append({"key": key, "value": value, "timestamp": now_ms,
                           "step": event["step"]})
    return points


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _tags(pairs: dict) -> list[dict]:
    return [{"key": k, "value": str(v)[:MAX_TAG_VALUE]} for k, v in pairs.items()
            if v is not None]


# ---- the run -------------------------------------------------------------------------------
class Tracker:
    """One attempt's view of the job's MLflow run. Every method swallows tracking failures
    (they are recorded in `state` and `message`, and reported as warning events)."""

    def __init__(self, cfg: TrackingConfig, attempt: int, reporter, client: Client | None = None):
        self.cfg = cfg
        self.attempt = attempt
        self.reporter = reporter
        self.client = client or Client(cfg.mlflow.tracking_uri, cfg.request_timeout_seconds)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.state = "Logged"
        self.message: str | None = None
        self.resumed_run = False
        self._queue: list[dict] = []
        self._dropped = 0
        self._failures = 0
        self._lock = threading.Lock()  # the queue
        self._sending = threading.Lock()  # one sender at a time (the worker, then finish)
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    @property
    def url(self) -> str | None:
        if not self.run_id:
            return None
        return (f"{self.client.base}/#/experiments/{self.experiment_id}/runs/{self.run_id}")

    # ---- start ---------------------------------------------------------------------------
    def start(self, run_params: dict) -> None:
        """Find this job's run (a resumed attempt) or create it, log the parameters, and send
        per-step metrics from now on; all within start_budget_seconds."""
        deadline = time.monotonic() + self.cfg.start_budget_seconds
        try:
            self.experiment_id = self._experiment(deadline)
            self.run_id = self._find_run(deadline)
            self.resumed_run = self.run_id is not None
            if self.run_id is None:
                self.run_id = self._create_run(deadline)
            else:
                self.client.call("POST", "runs/update", {"run_id": self.run_id,
                                                          "status": "RUNNING"},
                                 deadline=deadline)
        except TrackingError as exc:
            self._failed(f"no tracking run: {exc}")
            return
        self._log_batch(params=run_params, tags={TAG_ATTEMPT: self.attempt}, deadline=deadline)
        self.reporter.emit({"event": "tracking", "state": self.state, "runId": self.run_id,
                            "experimentId": self.experiment_id, "url": self.url,
                            "resumedRun": self.resumed_run})
        status = getattr(self.reporter, "status", None)
        if status is not None:  # the link in status while training, not only at the end
            status.patch({"tracking": {**{k: v for k, v in self.report().items()
                                          if k != "system"}, "attempt": self.attempt}})
        self.reporter.listeners.append(self.on_event)
        self._worker = threading.Thread(target=self._flush_loop, name="mlflow", daemon=True)
        self._worker.start()

    def _experiment(self, deadline: float) -> str:
        name = self.cfg.mlflow.experiment
        try:
            found = self.client.call("GET", "experiments/get-by-name",
                                     query={"experiment_name": name}, deadline=deadline)
        except TrackingError as exc:
            if exc.code != "RESOURCE_DOES_NOT_EXIST":
                raise
            try:
                made = self.client.call("POST", "experiments/create", {"name": name},
                                        deadline=deadline)
                return str(made["experiment_id"])
            except TrackingError as again:  # another job created it meanwhile
                if again.code != "RESOURCE_ALREADY_EXISTS":
                    raise
                found = self.client.call("GET", "experiments/get-by-name",
                                         query={"experiment_name": name}, deadline=deadline)
        experiment = found.get("experiment") or {}
        if experiment.get("lifecycle_stage") == "deleted":
            raise TrackingError(f"experiment {name!r} is deleted (restore it or name another)")
        if not experiment.get("experiment_id"):
            raise TrackingError("experiments/get-by-name: no experiment_id in the answer")
        return str(experiment["experiment_id"])

    def _find_run(self, deadline: float) -> str | None:
        uid = self.cfg.job_uid
        if not uid:
            return None  # kubetune run: no identity to find a run by
        found = self.client.call("POST", "runs/search", {
            "experiment_ids": [self.experiment_id],
            "filter": f"tags.`{TAG_UID}` = '{uid}'",  # uid: [A-Za-z0-9-] (the config's pattern)
            "max_results": 1, "order_by": ["attributes.start_time DESC"]}, deadline=deadline)
        runs = found.get("runs") or []
        info = (runs[0].get("info") or {}) if runs and isinstance(runs[0], dict) else {}
        return str(info["run_id"]) if info.get("run_id") else None

    def _create_run(self, deadline: float) -> str:
        m = self.cfg.mlflow
        tags = {**(m.tags or {}), TAG_UID: self.cfg.job_uid, "kubetune.job": self.cfg.job_name,
                "kubetune.namespace": self.cfg.namespace, "mlflow.source.name": "kubetune",
                "mlflow.runName": m.run_name or self.cfg.job_name}
        made = self.client.call("POST", "runs/create", {
            "experiment_id": self.experiment_id, "run_name": m.run_name or self.cfg.job_name,
            "start_time": int(time.time() * 1000), "tags": _tags(tags)}, deadline=deadline)
        run_id = ((made.get("run") or {}).get("info") or {}).get("run_id")
        if not run_id:
            raise TrackingError("runs/create: no run_id in the answer")
        return str(run_id)

    # ---- per-step metrics ----------------------------------------------------------------
    def on_event(self, event: dict) -> None:
        """A Reporter listener: queue the event's metrics (the training thread never waits on
        the network)."""
        points = step_points(event, int(time.time() * 1000))
        if not points:
            return
        with self._lock:
            self._queue.extend(points)
            extra = len(self._queue) - MAX_QUEUED_POINTS
            if extra > 0:
                del self._queue[:extra]
                self._dropped += extra

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.cfg.flush_seconds):
            self._flush(time.monotonic() + self.cfg.request_timeout_seconds)

    def _flush(self, deadline: float) -> None:
        with self._sending:
            self._send_queued(deadline)

    def _send_queued(self, deadline: float) -> None:
        while self._failures < FAILURES_BEFORE_GIVING_UP:
            with self._lock:
                batch = self._queue[:METRICS_PER_BATCH]
            if not batch or time.monotonic() >= deadline:
                return
            if not self._log_batch(metrics=batch, deadline=deadline):
                return
            with self._lock:
                del self._queue[:len(batch)]

    def _log_batch(self, metrics=(), params: dict | None = None, tags: dict | None = None,
                   deadline: float | None = None) -> bool:
        """One or more log-batch calls; False (and the state degraded) when one failed."""
        if self.run_id is None or self._failures >= FAILURES_BEFORE_GIVING_UP:
            return False
        items = list((params or {}).items())
        try:
            for i in range(0, max(len(items), 1), PARAMS_PER_BATCH):
                body = {"run_id": self.run_id, "metrics": list(metrics) if i == 0 else [],
                        "params": [{"key": k, "value": v}
                                   for k, v in items[i:i + PARAMS_PER_BATCH]],
                        "tags": _tags(tags or {}) if i == 0 else []}
                self.client.call("POST", "runs/log-batch", body, deadline=deadline)
        except TrackingError as exc:
            self._failures += 1
            self._degraded(str(exc))
            return False
        self._failures = 0
        return True

    # ---- end -----------------------------------------------------------------------------
    def lineage(self) -> dict | None:
        """What the artifact's manifest records about the run (pinned by its digest)."""
        if not self.run_id:
            return None
        return {"system": "mlflow", "runId": self.run_id, "experimentId": self.experiment_id,
                "trackingUri": self.client.base}

    def finish(self, status: str, summary: dict | None = None) -> dict:
        """The last writes (queued points, final metrics, the artifact's URI and digest, the
        run's status), within finish_budget_seconds; returns the summary's `tracking`."""
        deadline = time.monotonic() + self.cfg.finish_budget_seconds
        if self._worker is not None:
            self._stop.set()
            self._worker.join(timeout=max(0.0, min(self.cfg.request_timeout_seconds,
                                                  deadline - time.monotonic())))
        if self.run_id is not None:
            self._flush(deadline)
            self._final(summary or {}, deadline)
            try:
                self.client.call("POST", "runs/update", {
                    "run_id": self.run_id, "status": status,
                    "end_time": int(time.time() * 1000)}, deadline=deadline)
            except TrackingError as exc:
                self._degraded(f"could not mark the run {status}: {exc}")
        if self._dropped:
            self._degraded(f"{self._dropped} per-step metric points were dropped")
        if self._queue and self.state != "Failed":
            self._degraded(f"{len(self._queue)} per-step metric points were not sent")
        return self.report()

    def _final(self, summary: dict, deadline: float) -> None:
        metrics = summary.get("metrics") or {}
        step = metrics.get("steps") if isinstance(metrics.get("steps"), int) else 0
        now = int(time.time() * 1000)
        points = [{"key": key, "value": _number(metrics.get(key)), "timestamp": now,
                   "step": step} for key in FINAL_METRICS if _number(metrics.get(key)) is not None]
        artifact, merged = summary.get("artifact") or {}, summary.get("merged") or {}
        tags = {"kubetune.artifact.uri": artifact.get("uri"),
                "kubetune.artifact.manifest-sha256": artifact.get("manifestSha256"),
                "kubetune.artifact.size-bytes": artifact.get("sizeBytes"),
                "kubetune.merged.uri": merged.get("uri"),
                "kubetune.merged.manifest-sha256": merged.get("manifestSha256")}
        if points or any(v is not None for v in tags.values()):
            self._log_batch(metrics=points, tags=tags, deadline=deadline)

    def report(self) -> dict:
        out = {"system": "mlflow", "runId": self.run_id, "experimentId": self.experiment_id,
               "url": self.url, "state": self.state, "message": self.message}
        return {k: v for k, v in out.items() if v is not None}

    def _failed(self, message: str) -> None:
        self.state, self.message = "Failed", message[:1000]
        self._warn(message)

    def _degraded(self, message: str) -> None:
        if self.state == "Logged":
            self.state, self.message = "Degraded", message[:1000]
            self._warn(message)

    def _warn(self, message: str) -> None:
        self.reporter.emit({"event": "warning", "source": "tracking",
                            "message": f"experiment tracking: {message[:500]} (training goes "
                                       f"on)"})


class NoTracker:
    """Tracking off (or not rank 0): every call does nothing."""

    run_id = None

    def start(self, run_params: dict) -> None:
        pass

    def lineage(self) -> None:
        return None

    def finish(self, status: str, summary: dict | None = None) -> None:
        return None


def for_config(cfg: TrainerConfig, reporter, rank: int) -> Tracker | NoTracker:
    if cfg.tracking is None or rank != 0:
        return NoTracker()
    attempt = cfg.logging.status.attempt if cfg.logging.status else 0
    return Tracker(cfg.tracking, attempt, reporter)
