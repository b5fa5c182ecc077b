"""The operator's engine client against a hostile serving pod: a real HTTP server on loopback
that drips, redirects, floods or answers garbage. Every call ends within its deadline, the API
key never reaches another host, and only a bounded printable excerpt is kept."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kubetune_operator.adapters import _fan_out
from kubetune_operator.engine import MAX_MESSAGE, Engine, EngineError

pytestmark = pytest.mark.unit


class Fault:
    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.seen: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                server.seen.append({"path": self.path, "auth": self.headers.get("Authorization")})
                try:
                    server.behaviour(self)
                except OSError:
                    pass

            do_POST = do_GET

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.port = self.httpd.server_port

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fault():
    made = []

    def make(behaviour):
        made.append(Fault(behaviour))
        return made[-1]

    yield make
    for f in made:
        f.close()


def reply(handler, status: int, body: bytes, headers: dict | None = None):
    handler.send_response(status)
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def test_a_pod_that_drips_one_byte_at_a_time_is_cut_at_the_deadline(fault):
    def drip(h):
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(100):  # one header byte every 0.3 s: each read is "on time"
            h.wfile.write(b"X")
            h.wfile.flush()
            time.sleep(0.3)

    f = fault(drip)
    start = time.monotonic()
    with pytest.raises(EngineError) as err:
        Engine("127.0.0.1", f.port, timeout=2.0).models()
    assert err.value.reason == "Timeout"
    assert time.monotonic() - start < 4.0


def test_a_redirect_is_not_followed_and_the_key_stays_home(fault):
    elsewhere = fault(lambda h: reply(h, 200, b'{"data": []}'))
    f = fault(lambda h: reply(h, 302, b"", {"Location":
                                             f"http://127.0.0.1:{elsewhere.port}/v1/models"}))
    with pytest.raises(EngineError, match="redirects are not followed"):
        Engine("127.0.0.1", f.port, api_key="s3cret").models()
    assert f.seen[0]["auth"] == "Bearer s3cret"
    assert elsewhere.seen == []


def test_a_flood_is_cut_at_the_size_cap(fault):
    f = fault(lambda h: reply(h, 200, b"[" + b"0," * 5_000_000 + b"0]"))
    with pytest.raises(EngineError) as err:
        Engine("127.0.0.1", f.port, max_response_bytes=1024 * 1024).models()
    assert err.value.reason == "BadResponse" and "larger than" in str(err.value)


@pytest.mark.parametrize("body", [b"garbage", b'{"data": 7}', b'{"data": [1, 2]}',
                                  b'{"data": [{"parent": "x"}]}', b"[]"])
def test_garbage_model_lists_are_a_bad_response(fault, body):
    f = fault(lambda h: reply(h, 200, body))
    with pytest.raises(EngineError) as err:
        Engine("127.0.0.1", f.port).models()
    assert err.value.reason == "BadResponse"


def test_an_error_body_reaches_status_bounded_and_printable(fault):
    message = "\x1b[31mrank too high\n" + "A" * 10_000
    f = fault(lambda h: reply(h, 400, json.dumps({"message": message}).encode()))
    with pytest.raises(EngineError) as err:
        Engine("127.0.0.1", f.port).load("a", "/adapters/a")
    text = str(err.value)
    assert err.value.reason == "LoadRejected" and "rank too high" in text
    assert "\x1b" not in text and "\n" not in text
    assert len(text) < MAX_MESSAGE + 80
    f2 = fault(lambda h: reply(h, 500, b"<html>" + b"x" * 5000))
    with pytest.raises(EngineError) as err:
        Engine("127.0.0.1", f2.port).load("a", "/adapters/a")
    assert "<html>" not in str(err.value) and "no JSON error message" in str(err.value)


def test_a_full_download_cache_is_its_own_reason(fault):
    """serve and the sync sidecar answer 507 when an adapter does not fit their disk limit:
    the status says so rather than a generic rejection."""
    f = fault(lambda h: reply(h, 507, json.dumps({"message": "needs 9 bytes"}).encode()))
    for call in (lambda e: e.load("a", "s3://b/a"),
                 lambda e: e.sync(f.port, "s3://b/a", "0" * 64, "/adapters/a")):
        with pytest.raises(EngineError) as err:
            call(Engine("127.0.0.1", f.port))
        assert err.value.reason == "InsufficientStorage" and "needs 9 bytes" in str(err.value)


def test_a_closed_port_is_unreachable(fault):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EngineError) as err:
        Engine("127.0.0.1", port).models()
    assert err.value.reason == "Unreachable"


def test_one_slow_replica_does_not_hold_another_adapters_calls():
    """Each fan-out has its own threads: a call stuck on one adapter's replica does not queue
    another adapter's calls behind it (the old shared pool of 16 did)."""
    release = threading.Event()

    def stuck(_):
        release.wait(10)

    blocker = threading.Thread(target=_fan_out, args=(stuck, list(range(40))))
    blocker.start()
    try:
        start = time.monotonic()
        assert _fan_out(lambda x: x * 2, [1, 2, 3]) == [2, 4, 6]
        assert time.monotonic() - start < 2
    finally:
        release.set()
        blocker.join()


def test_an_s3_endpoint_that_drips_cannot_hold_the_operator(fault):
    """The operator's reads from S3 have a total deadline too: an "S3" that answers a GET with
    a 10 MB Content-Length and then one byte at a time is given up on in time."""
    from kubetune.storage import Storage, StorageError

    def drip(h):
        h.send_response(200)
        h.send_header("Content-Length", str(10_000_000))
        h.send_header("ETag", '"x"')
        h.end_headers()
        for _ in range(200):
            h.wfile.write(b"x")
            h.wfile.flush()
            time.sleep(0.1)

    f = fault(drip)
    storage = Storage(f"http://127.0.0.1:{f.port}", access_key="a", secret_key="b",
                      retries=1, deadline=2.0, min_rate=1e12)
    for call in (lambda: storage.get_bytes("s3://bucket/manifest.json", limit=1 << 20),
                 lambda: storage.sha256("s3://bucket/model.bin", 10_000_000)):
        start = time.monotonic()
        with pytest.raises(StorageError, match="no complete answer within 2 s"):
            call()
        assert time.monotonic() - start < 4
