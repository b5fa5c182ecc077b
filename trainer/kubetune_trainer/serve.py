"""`kubetune serve`: an OpenAI-compatible server on transformers + PEFT that hot-swaps adapters
of every method we train, speaking vLLM's runtime LoRA API.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
POST /v1/load_lora_adapter {lora_name, lora_path}, POST /v1/unload_lora_adapter {lora_name},
GET /health, GET /metrics (Prometheus). With `--api-key` (or $KUBETUNE_API_KEY /
$VLLM_API_KEY), every route but /health and /metrics needs `Authorization: Bearer <key>`.
Requests name the adapter in "model" (the base model's served name selects no adapter);
`max_tokens`, `temperature`, `stream`, `logprobs` / `top_logprobs` and vLLM's `ignore_eos` are
honoured, and prompt + max_tokens must fit the model's context (`max_model_len`). `lora_path`
may be a local folder or an s3:// artifact (downloaded and verified against its manifest).
Errors have vLLM's shape: {"object": "error", "message", "type", "code"}.

This module is the HTTP layer; the adapters live in registry.py, the OpenAI request and
response shapes in completions.py.
"""

from __future__ import annotations

import hmac
import itertools
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .completions import Completions
from .registry import MAX_CACHE_BYTES, AdapterRegistry, ServeError

MAX_REQUEST_BYTES = 4 * 1024 * 1024  # a request body larger than this is answered 413
READ_TIMEOUT = 60.0  # seconds a client may take to send its request


def authorized(headers, api_key: str | None) -> bool:
    """True when no key is configured or the request carries `Authorization: Bearer <key>`
    (compared in constant time)."""
    if not api_key:
        return True
    given = headers.get("Authorization") or ""
    return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())


def read_body(handler: BaseHTTPRequestHandler, limit: int) -> bytes:
    """The request body, refused (413) above `limit` before a byte of it is read."""
    try:
        length = int(handler.headers.get("Content-Length") or 0)
    except ValueError:
        raise ServeError("Content-Length is not a number") from None
    if length < 0:
        raise ServeError("Content-Length is negative")
    if length > limit:
        handler.close_connection = True  # the unread body must not be parsed as a request
        raise ServeError(f"request body of {length} bytes is larger than the {limit}-byte "
                         f"limit", 413, "RequestTooLarge")
    return handler.rfile.read(length)


OPEN_PATHS = ("/health", "/metrics")  # everything else needs the key when one is set


def make_handler(server: Completions, api_key: str | None = None,
                 max_request_bytes: int = MAX_REQUEST_BYTES):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = READ_TIMEOUT  # a client that stops sending is dropped, not waited on

        def log_message(self, *args):  # quiet; errors are in responses
            pass

        def _send(self, status: int, payload, text: bool = False) -> None:
            data = (payload if text else json.dumps(payload)).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if text else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _stream(self, chunks) -> None:
            """Server-sent events; the first chunk is computed before the headers go out, so
            an error still gets a proper status. The connection closes at the end."""
            first = next(chunks)
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                try:
                    for chunk in itertools.chain([first], chunks):
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                except ServeError as exc:  # after the headers: an error event, as vLLM does
                    server.metrics.inc("kubetune_serve_request_errors_total",
                                       status=str(exc.status))
                    self.wfile.write(f"data: {json.dumps(exc.body())}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away; closing the generator ends the generation
            finally:
                chunks.close()

        def _body(self) -> dict:
            raw = read_body(self, max_request_bytes)
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                raise ServeError("request body is not valid JSON") from None
            if not isinstance(body, dict):
                raise ServeError("request body must be a JSON object")
            return body

        def _allowed(self) -> bool:
            if self.path in OPEN_PATHS or authorized(self.headers, api_key):
                return True
            self.close_connection = True
            self._error(ServeError("Unauthorized: a valid 'Authorization: Bearer <api key>' "
                                   "header is required", 401, "AuthenticationError"))
            return False

        def do_GET(self):  # noqa: N802
            if not self._allowed():
                return
            if self.path == "/health":
                self._send(200, "", text=True)
            elif self.path == "/v1/models":
                self._send(200, server.registry.models())
            elif self.path == "/metrics":
                self._send(200, server.metrics.render(), text=True)
            else:
                self._send(404, ServeError(f"no route {self.path}", 404, "NotFoundError").body())

        def do_POST(self):  # noqa: N802
            if not self._allowed():
                return
            try:
                body = self._body()
                if self.path == "/v1/load_lora_adapter":
                    self._send(200, server.registry.load(body.get("lora_name", ""),
                                                body.get("lora_path", "")), text=True)
                elif self.path == "/v1/unload_lora_adapter":
                    self._send(200, server.registry.unload(body.get("lora_name", "")), text=True)
                elif self.path in ("/v1/completions", "/v1/chat/completions"):
                    chat = self.path == "/v1/chat/completions"
                    if body.get("stream"):
                        self._stream(server.completion_chunks(body, chat))
                    else:
                        self._send(200, server.completion(body, chat))
                else:
                    raise ServeError(f"no route {self.path}", 404, "NotFoundError")
            except ServeError as exc:
                self._error(exc)
            except Exception as exc:  # noqa: BLE001
                self._error(ServeError(f"{type(exc).__name__}: {exc}", 500,
                                       "InternalServerError"))

        def _error(self, exc: ServeError) -> None:
            server.metrics.inc("kubetune_serve_request_errors_total", status=str(exc.status))
            self._send(exc.status, exc.body())

    return Handler


def build(model_uri: str, revision: str | None, served_name: str | None, host: str, port: int,
          max_loras: int, max_lora_rank: int, cache_dir: Path, api_key: str | None = None,
          max_virtual_tokens: int = 128, max_request_bytes: int = MAX_REQUEST_BYTES,
          max_cache_bytes: int = MAX_CACHE_BYTES) -> ThreadingHTTPServer:
    """Resolve the base model (builtin://, s3://, file://, hf://), load it once, bind."""
    from .sources import resolve_model
    from kubetune.storage import Storage

    base_path = resolve_model(model_uri, revision, cache_dir, Storage())
    registry = AdapterRegistry(base_path, served_name or model_uri, max_loras, max_lora_rank,
                               cache_dir / "adapters", model_uri=model_uri,
                               max_virtual_tokens=max_virtual_tokens,
                               max_cache_bytes=max_cache_bytes)
    httpd = ThreadingHTTPServer((host, port), make_handler(Completions(registry), api_key,
                                                           max_request_bytes))
    httpd.daemon_threads = True
    return httpd


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os
    import signal
    import sys

    parser = argparse.ArgumentParser(prog="kubetune serve", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=os.environ.get("KUBETUNE_MODEL"),
                        help="base model URI (builtin://, s3://, file://, hf://); "
                             "default $KUBETUNE_MODEL")
    parser.add_argument("--revision", default=os.environ.get("KUBETUNE_MODEL_REVISION"))
    parser.add_argument("--served-model-name", default=None,
                        help="name of the base model in the API (default: the model URI)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-loras", type=int, default=8)
    parser.add_argument("--max-lora-rank", type=int, default=64,
                        help="largest LoRA rank accepted (r and every rank_pattern value)")
    parser.add_argument("--max-virtual-tokens", type=int, default=128,
                        help="largest num_virtual_tokens of a prefix-tuning adapter")
    parser.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES,
                        help="larger request bodies are answered 413")
    parser.add_argument("--max-cache-bytes", type=int,
                        default=int(os.environ.get("KUBETUNE_MAX_CACHE_BYTES", MAX_CACHE_BYTES)),
                        help="all s3:// adapter downloads together (kept while loaded); a load "
                             "that would not fit is answered 507 before a byte is fetched")
    parser.add_argument("--api-key", default=os.environ.get("KUBETUNE_API_KEY")
                        or os.environ.get("VLLM_API_KEY"),
                        help="require 'Authorization: Bearer <key>' on every route but /health "
                             "and /metrics (default $KUBETUNE_API_KEY, else $VLLM_API_KEY)")
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(os.environ.get("KUBETUNE_CACHE_DIR", "/tmp/kubetune-serve")))
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("--model is required (or set KUBETUNE_MODEL)")
    from .sources import SourceError

    try:
        httpd = build(args.model, args.revision, args.served_model_name, args.host, args.port,
                      args.max_loras, args.max_lora_rank, args.cache_dir, args.api_key,
                      args.max_virtual_tokens, args.max_request_bytes, args.max_cache_bytes)
    except SourceError as exc:
        print(f"kubetune serve: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a model that does not load: one line, exit 1
        print(f"kubetune serve: error: cannot load {args.model}: {type(exc).__name__}: "
              f"{str(exc).splitlines()[0][:500] if str(exc) else ''}", file=sys.stderr)
        return 1
    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    if not args.api_key and args.host not in ("127.0.0.1", "::1", "localhost"):
        print("kubetune serve: warning: no --api-key: anyone who reaches this port can load, "
              "replace and unload adapters", file=sys.stderr)
    print(json.dumps({"event": "serving", "model": args.model, "host": args.host,
                      "port": args.port, "auth": bool(args.api_key)}), flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
