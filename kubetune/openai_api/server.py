"""The HTTP layer of `kubetune api`: OpenAI's fine-tuning routes on the standard library's
threading HTTP server (like `kubetune serve`), every answer JSON, every error in OpenAI's shape.

Hostile clients: a body must declare its length and stay under a cap (413 otherwise), must
arrive within a deadline, ids are checked before use, and every upstream call has a deadline."""

from __future__ import annotations

import email.parser
import hashlib
import email.policy
import json
import re
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from . import datafiles, ids, jobspec, views
from .backend import Files, Kube, now_rfc3339
from .config import Settings
from .errors import ApiError, error_body, invalid, not_found
from .keys import KeyRing, bearer

MAX_JSON_BYTES = 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024
MIN_RATE = 256 * 1024  # bytes/s a body must at least arrive at, after a 30 s grace
SOCKET_TIMEOUT = 30


class App:
    """What the routes need: settings, the two stores and the key ring."""

    def __init__(self, settings: Settings, kube: Kube, files: Files):
        self.settings, self.kube, self.files = settings, kube, files
        self.keys = KeyRing(kube.key_secrets)


ROUTES: list[tuple[str, re.Pattern, str]] = [
    ("POST", re.compile(r"^/v1/files$"), "upload"),
    ("GET", re.compile(r"^/v1/files$"), "list_files"),
    ("GET", re.compile(r"^/v1/files/([^/]+)$"), "get_file"),
    ("DELETE", re.compile(r"^/v1/files/([^/]+)$"), "delete_file"),
    ("GET", re.compile(r"^/v1/files/([^/]+)/content$"), "file_content"),
    ("POST", re.compile(r"^/v1/fine_tuning/jobs$"), "create_job"),
    ("GET", re.compile(r"^/v1/fine_tuning/jobs$"), "list_jobs"),
    ("GET", re.compile(r"^/v1/fine_tuning/jobs/([^/]+)$"), "get_job"),
    ("POST", re.compile(r"^/v1/fine_tuning/jobs/([^/]+)/cancel$"), "cancel_job"),
    ("GET", re.compile(r"^/v1/fine_tuning/jobs/([^/]+)/events$"), "job_events"),
    ("GET", re.compile(r"^/v1/fine_tuning/jobs/([^/]+)/checkpoints$"), "job_checkpoints"),
]


class Handler(BaseHTTPRequestHandler):
    server_version = "kubetune-api"
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT  # a client that stops sending loses its connection

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def log_message(self, fmt: str, *args) -> None:  # one line per request, on stderr
        sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    # ---- plumbing ---------------------------------------------------------------------------
    def _dispatch(self, verb: str) -> None:
        url = urlsplit(self.path)
        try:
            if url.path == "/healthz":
                return self._send(200, {"status": "ok"})
            route = _route(verb, url.path)
            namespace = self.server.app.keys.namespace(bearer(self.headers.get("Authorization")))
            if namespace is None:
                raise ApiError(401, "Incorrect API key provided", None, "invalid_api_key")
            name, args = route
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            status, body = getattr(Routes(self, namespace, query), name)(*args)
            kind = "application/octet-stream" if isinstance(body, bytes) else "application/json"
            self._send(status, body, kind)
        except ApiError as exc:
            self._send(exc.status, exc.body())
        except Exception as exc:  # noqa: BLE001 - a bug is a 500, not a dropped connection
            sys.stderr.write(f"kubetune api: {self.command} {url.path}: "
                             f"{type(exc).__name__}: {exc}\n")
            self._send(500, error_body(500, "internal error", None, "internal_error"))

    def _send(self, status: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if status >= 400 and self.headers.get("Content-Length") not in (None, "0") \
                and not getattr(self, "_body_read", False):
            self.send_header("Connection", "close")  # the unread body must not be parsed
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def read_body(self, cap: int) -> bytes:
        """The request body: declared (411 otherwise), at most `cap` bytes (413), and arriving
        at MIN_RATE after a grace period (408)."""
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "send the body with a Content-Length, not chunked")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(411, "Content-Length is required") from None
        if length < 0 or length > cap:
            raise ApiError(413, f"the request body is over the {cap}-byte limit")
        deadline = time.monotonic() + SOCKET_TIMEOUT + length / MIN_RATE
        chunks, left = [], length
        while left:
            chunk = self.rfile.read(min(left, 1024 * 1024))
            if not chunk or time.monotonic() > deadline:
                self.close_connection = True
                raise ApiError(408, "the request body did not arrive in time")
            chunks.append(chunk)
            left -= len(chunk)
        self._body_read = True
        return b"".join(chunks)

    def read_json(self) -> dict[str, Any]:
        try:
            body = json.loads(self.read_body(MAX_JSON_BYTES) or b"{}")
        except ValueError:
            raise invalid("the body is not JSON") from None
        if not isinstance(body, dict):
            raise invalid("the body must be a JSON object")
        return body


def _route(verb: str, path: str) -> tuple[str, tuple[str, ...]]:
    allowed = False
    for method, pattern, name in ROUTES:
        match = pattern.match(path)
        if match:
            allowed = True
            if method == verb:
                return name, match.groups()
    if allowed:
        raise ApiError(405, f"{verb} is not allowed on {path[:128]}")
    raise ApiError(404, f"Unknown route {verb} {path[:128]}", None, "unknown_url")


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """multipart/form-data -> {field: (filename, bytes)} (the standard library's MIME parser;
    `cgi` is gone from Python 3.13)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(415, "upload a file as multipart/form-data")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise invalid("the multipart body could not be parsed")
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str) and name not in fields:
            fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


class Routes:
    """One request's handlers; each returns (HTTP status, JSON body)."""

    def __init__(self, handler: Handler, namespace: str, query: dict[str, str]):
        self.handler, self.namespace, self.query = handler, namespace, query
        self.app: App = handler.server.app

    # ---- files ------------------------------------------------------------------------------
    def upload(self):
        cap = self.app.settings.max_file_bytes
        body = self.handler.read_body(cap + MULTIPART_OVERHEAD)
        fields = parse_multipart(self.handler.headers.get("Content-Type", ""), body)
        purpose = fields.get("purpose", (None, b""))[1].decode(errors="replace").strip()
        if purpose != "fine-tune":
            raise invalid("purpose must be fine-tune", "purpose")
        if "file" not in fields:
            raise invalid("the file field is missing", "file")
        filename, data = fields["file"]
        if len(data) > cap:
            raise ApiError(413, f"the file is over the {cap}-byte limit", "file")
        kind, converted, records = datafiles.convert_jsonl(data)
        file_id = ids.new_file_id()
        record = {"id": file_id, "bytes": len(data), "created_at": int(time.time()),
                  "filename": _filename(filename), "kind": kind, "records": records,
                  "sha256": hashlib.sha256(converted).hexdigest(),
                  "uri": self.app.files.data_uri(self.namespace, file_id)}
        self.app.files.put(self.namespace, record, converted)
        return 200, views.file_object(record)

    def list_files(self):
        records = [views.file_object(r) for r in self.app.files.list(self.namespace)]
        if self.query.get("purpose") not in (None, "fine-tune"):
            records = []
        return 200, views.page(records, self.query.get("after"), self.query.get("limit"),
                               default=100)

    def get_file(self, file_id: str):
        return 200, views.file_object(self._file(file_id, "file_id"))

    def delete_file(self, file_id: str):
        ids.checked("file", file_id, "file_id")
        self.app.files.delete(self.namespace, file_id)
        return 200, {"id": file_id, "object": "file", "deleted": True}

    def file_content(self, file_id: str):
        record = self._file(file_id, "file_id")
        data = self.app.files.content(self.namespace, record["id"],
                                      self.app.settings.max_file_bytes * 2)
        return 200, data

    def _file(self, file_id: str, param: str) -> dict[str, Any]:
        ids.checked("file", file_id, param)
        try:
            return self.app.files.get(self.namespace, file_id)
        except ApiError as exc:
            if exc.status == 404:
                raise not_found("file", file_id, param) from None
            raise

    # ---- jobs -------------------------------------------------------------------------------
    def create_job(self):
        body = self.handler.read_json()
        files = {}
        for param in ("training_file", "validation_file"):
            if body.get(param) is not None or param == "training_file":
                try:
                    record = self._file(body.get(param), param)
                except ApiError as exc:
                    if exc.status != 404:
                        raise
                    raise invalid(f"invalid {param}: {body.get(param)}", param,
                                  "invalid_file") from None
                files[record["id"]] = record
        job_id = ids.new_job_id()
        manifest = jobspec.build_job(body, job_id, files, self.app.settings)
        _check_spec(manifest["spec"])
        created = self.app.kube.create_job(self.namespace, manifest)
        return 200, views.job_object(created, time.time())

    def list_jobs(self):
        jobs = [views.job_object(o, time.time()) for o in self.app.kube.list_jobs(self.namespace)]
        return 200, views.page(jobs, self.query.get("after"), self.query.get("limit"))

    def get_job(self, job_id: str):
        return 200, views.job_object(self._job(job_id), time.time())

    def cancel_job(self, job_id: str):
        obj = self._job(job_id)
        state = views.job_status(obj)
        if state in views.FINISHED:
            raise invalid(f"the job is already {state}", "fine_tuning_job_id",
                          "job_already_finished")
        patched = self.app.kube.cancel(self.namespace, job_id, now_rfc3339())
        return 200, views.job_object(patched, time.time())

    def job_events(self, job_id: str):
        obj = self._job(job_id)
        events = views.job_events(obj, self.app.kube.events(self.namespace, obj))
        return 200, views.page(events, self.query.get("after"), self.query.get("limit"))

    def job_checkpoints(self, job_id: str):
        obj = self._job(job_id)
        output = ((obj.get("spec") or {}).get("output") or {}).get("uri") or ""
        checkpoints = views.job_checkpoints(obj, self.app.files.checkpoints(output))
        return 200, views.page(checkpoints, self.query.get("after"), self.query.get("limit"),
                               default=10)

    def _job(self, job_id: str) -> dict[str, Any]:
        ids.checked("job", job_id, "fine_tuning_job_id")
        obj = self.app.kube.get_job(self.namespace, job_id)
        if obj is None:
            raise not_found("fine_tuning_job", job_id, "fine_tuning_job_id")
        return obj


def _filename(name: str | None) -> str:
    """The client's file name, shown back to it only: control characters dropped, capped."""
    return re.sub(r"[\x00-\x1f\x7f]", "", name or "upload.jsonl")[:255] or "upload.jsonl"


def _check_spec(spec: dict[str, Any]) -> None:
    """Our own models judge the spec first, so a bad request (or bad --spec-defaults) is a 400
    naming the field rather than the apiserver's schema text."""
    from pydantic import ValidationError

    from ..api.finetunejob import FineTuneJobSpec

    try:
        FineTuneJobSpec.model_validate(spec)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise invalid(f"the FineTuneJob spec is invalid at spec.{where}: {first.get('msg')}",
                      None, "invalid_job") from None


def make_server(host: str, port: int, app: App) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.app = app
    return server


def serve(settings: Settings, host: str, port: int, kubeconfig: str | None,
          ready: Callable[[ThreadingHTTPServer], None] | None = None) -> int:
    from kubernetes import client, config

    if kubeconfig:
        api = config.new_client_from_config(config_file=kubeconfig)
    else:
        config.load_incluster_config()
        api = client.ApiClient()
    server = make_server(host, port, App(settings, Kube(api, settings), Files(settings)))
    print(f"kubetune api: listening on http://{host}:{server.server_address[1]}",
          file=sys.stderr, flush=True)
    if ready:
        ready(server)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
