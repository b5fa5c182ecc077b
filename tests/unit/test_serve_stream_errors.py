"""`kubetune serve`'s SSE framing when generation fails after the stream has begun: the
client gets an error event in vLLM's shape and `[DONE]`, never a second HTTP response.

The server object here is a stand-in for serve's Completions (no model): only its streaming
contract (a generator of chunks that may raise ServeError) is exercised, over real HTTP."""

import json
import threading
import urllib.request
from http.server import ThreadingHTTPServer

import pytest

from kubetune_trainer.serve import ServeError, make_handler
from kubetune_trainer.servemetrics import ServeMetrics

pytestmark = pytest.mark.unit


class FailingMidStream:
    def __init__(self):
        self.metrics = ServeMetrics()
        self.closed = False

    def completion_chunks(self, body, chat):
        try:
            yield {"choices": [{"index": 0, "text": "Hello", "finish_reason": None}]}
            raise ServeError("generation failed: RuntimeError: out of memory", 500,
                             "InternalServerError")
        finally:
            self.closed = True


def test_an_error_after_the_first_chunk_becomes_an_error_event():
    stub = FailingMidStream()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(stub))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        req = urllib.request.Request(
            f"http://127.0.0.1:{httpd.server_port}/v1/completions", method="POST",
            data=json.dumps({"model": "m", "prompt": "x", "stream": True}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
            events = [line.decode().strip()[6:] for line in resp
                      if line.startswith(b"data: ")]
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["text"] == "Hello"
    error = json.loads(events[1])
    assert error == {"object": "error", "message": "generation failed: RuntimeError: out of "
                     "memory", "type": "InternalServerError", "code": 500}
    assert len(events) == 3 and stub.closed
    assert 'kubetune_serve_request_errors_total{status="500"} 1' in stub.metrics.render()
