"""`kubetune serve`: an OpenAI-compatible server on transformers + PEFT that hot-swaps adapters
of every method we train, speaking vLLM's runtime LoRA API.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
POST /v1/load_lora_adapter {lora_name, lora_path}, POST /v1/unload_lora_adapter {lora_name},
GET /health, GET /metrics (Prometheus). With `--api-key` (or $KUBETUNE_API_KEY /
$VLLM_API_KEY), every route but /health and /metrics needs `Authorization: Bearer <key>`.
Requests name the adapter in "model" (the base model's served name selects no adapter);
`max_tokens`, `temperature`, `stream` and vLLM's `ignore_eos` are honoured, and prompt +
max_tokens must fit the model's context (`max_model_len`). `lora_path` may be a local folder
or an s3:// artifact (downloaded and verified against its manifest). Errors have vLLM's
shape: {"object": "error", "message", "type", "code"}.

The base weights are read once. Methods that rewrite modules in place cannot share one module
tree, so each method family (LoRA, IA3, prefix tuning, and each bottleneck adapter) gets its
own in-memory copy of the base, made on first use. Generation is serialised by a lock: an
adapter is activated and used by one request at a time, so concurrent requests for different
adapters never see each other's weights. A streamed request generates in its own thread into a
queue (a slow reader never holds the lock) and stops when its client goes away.
"""

from __future__ import annotations

import copy
import gc
import hmac
import itertools
import json
import queue
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from . import decoding
from .servemetrics import ServeMetrics

MAX_REQUEST_BYTES = 4 * 1024 * 1024  # a request body larger than this is answered 413
MAX_ADAPTER_BYTES = 8 * 1024 ** 3  # an s3:// adapter larger than this is refused unread
MAX_CACHE_BYTES = 32 * 1024 ** 3  # all s3:// adapter downloads together (--max-cache-bytes)
READ_TIMEOUT = 60.0  # seconds a client may take to send its request


class ServeError(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.kind = status, kind

    def body(self) -> dict:
        return {"object": "error", "message": str(self), "type": self.kind, "code": self.status}


@dataclass
class Loaded:
    name: str
    path: str
    method: str
    family: str
    rank: int | None
    created: int = field(default_factory=lambda: int(time.time()))
    owned: Path | None = None  # the download folder of an s3:// adapter, removed on unload
    owned_bytes: int = 0  # its size, held in the server's disk budget until unload


def adapter_limits(config: object, max_rank: int, max_virtual_tokens: int) -> None:
    """Refuse an adapter_config.json whose size parameters exceed the server's limits, before
    anything is loaded: `r` and every `rank_pattern` value against max_lora_rank, every
    `alpha_pattern` value a number, `num_virtual_tokens` against max_virtual_tokens."""
    if not isinstance(config, dict):
        raise ServeError("adapter_config.json is not an object")

    def number(value, what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ServeError(f"adapter_config.json: {what} must be a number, got {value!r:.60}")
        return value

    ranks = [("r", config.get("r"))] if config.get("r") is not None else []
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise ServeError(f"adapter_config.json: {key} must be an object")
        for module, value in pattern.items():
            if key == "rank_pattern":
                ranks.append((f"rank_pattern[{module[:60]!r}]", value))
            else:
                number(value, f"alpha_pattern[{module[:60]!r}]")
    for what, value in ranks:
        if number(value, what) > max_rank:
            raise ServeError(f"LoRA rank {value} ({what}) is greater than max_lora_rank "
                             f"{max_rank}.")
    tokens = config.get("num_virtual_tokens")
    if tokens is not None and number(tokens, "num_virtual_tokens") > max_virtual_tokens:
        raise ServeError(f"num_virtual_tokens {tokens} is greater than max_virtual_tokens "
                         f"{max_virtual_tokens}.")


class AdapterServer:
    def __init__(self, base_path: Path, served_name: str, max_loras: int = 8,
                 max_lora_rank: int = 64, cache_dir: Path = Path("/tmp/kubetune-serve"),
                 model_uri: str | None = None, max_virtual_tokens: int = 128,
                 max_cache_bytes: int = MAX_CACHE_BYTES):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .diskbudget import DiskBudget

        self.base_path = base_path
        self.model_uri = model_uri or str(base_path)
        self.served_name = served_name
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_virtual_tokens = max_virtual_tokens
        self.cache_dir = cache_dir
        # s3:// adapters are downloaded while loaded and removed on unload: their total is
        # capped, and a download that would not fit is refused before a byte is fetched.
        self.disk = DiskBudget(max_cache_bytes, what="the adapter download cache")
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_path))
        self.base = AutoModelForCausalLM.from_pretrained(str(base_path))
        self.base.eval()
        self.families: dict[str, object] = {}  # family -> model holding its adapters
        self.adapters: dict[str, Loaded] = {}
        self.lock = threading.Lock()
        self.created = int(time.time())
        self.max_model_len = int(getattr(self.base.config, "max_position_embeddings", 0)
                                 or 4096)
        # The longest text one token can stand for: a prompt longer than max_model_len times
        # this cannot fit, and is refused before it is tokenised.
        self.max_token_chars = max((len(t) for t in self.tokenizer.get_vocab()), default=64)
        self.metrics = ServeMetrics()

    # ---- adapters --------------------------------------------------------------------------
    def _resolve(self, lora_path: str) -> tuple[Path, int]:
        """The adapter's folder, and the bytes reserved in the disk budget for it (s3://)."""
        if lora_path.startswith("s3://"):
            from kubetune.artifacts import VerificationError, verify
            from .diskbudget import BudgetExceeded
            from kubetune.storage import Storage, StorageError

            dest = self.cache_dir / uuid.uuid4().hex
            held = [0]

            def reserve(total: int) -> None:
                self.disk.reserve(total)
                held[0] = total
            try:
                verify(lora_path, Storage(), dest, max_bytes=MAX_ADAPTER_BYTES,
                       reserve=reserve)
            except BaseException as exc:
                shutil.rmtree(dest, ignore_errors=True)
                self.disk.release(held[0])
                if isinstance(exc, BudgetExceeded):
                    raise ServeError(f"cannot load adapter from {lora_path}: {exc}", 507,
                                     "InsufficientStorageError") from None
                if isinstance(exc, (VerificationError, StorageError)):
                    raise ServeError(f"cannot load adapter from {lora_path}: {exc}") from None
                raise
            return dest, held[0]
        path = Path(lora_path.removeprefix("file://"))
        if not (path / "adapter_config.json").exists():
            raise ServeError(f"no adapter_config.json in {lora_path}", 404, "NotFoundError")
        return path, 0

    def load(self, name: str, lora_path: str) -> str:
        try:
            message = self._load(name, lora_path)
        except ServeError:
            self.metrics.inc("kubetune_serve_adapter_loads_total", result="error")
            raise
        self.metrics.inc("kubetune_serve_adapter_loads_total", result="success")
        self.metrics.set("kubetune_serve_adapters_loaded", len(self.adapters))
        self.metrics.set("kubetune_serve_adapter_cache_bytes", self.disk.used)
        return message

    def _load(self, name: str, lora_path: str) -> str:
        from .loading import adapter_method

        if not name or not lora_path:
            raise ServeError("Both 'lora_name' and 'lora_path' must be provided.")
        if not isinstance(name, str) or not isinstance(lora_path, str) or len(name) > 256 \
                or len(lora_path) > 4096:
            raise ServeError("'lora_name' (at most 256 characters) and 'lora_path' (at most "
                             "4096) must be strings")
        self._check_can_load(name)
        path, held = self._resolve(lora_path)  # downloads happen outside the lock
        owned = path if lora_path.startswith("s3://") else None
        try:
            with self.lock:
                self._check_can_load(name)
                try:
                    config = json.loads((path / "adapter_config.json").read_text())
                except (OSError, ValueError) as exc:
                    raise ServeError(f"cannot read adapter_config.json of {lora_path}: "
                                     f"{type(exc).__name__}") from None
                adapter_limits(config, self.max_lora_rank, self.max_virtual_tokens)
                method = adapter_method(path)
                family = {"LoRA": "lora", "IA3": "ia3", "PrefixTuning": "prefix"}.get(
                    method, f"bottleneck:{name}")
                self._attach(family, name, path, method)
                self.adapters[name] = Loaded(name, lora_path, method, family,
                                             config.get("r"), owned=owned, owned_bytes=held)
        except BaseException:
            if owned is not None:
                shutil.rmtree(owned, ignore_errors=True)
                self.disk.release(held)
            raise
        return f"Success: LoRA adapter '{name}' added successfully."

    def _check_can_load(self, name: str) -> None:
        if name in self.adapters or name == self.served_name:
            raise ServeError(f"The lora adapter '{name}' has already been loaded.")
        if len(self.adapters) >= self.max_loras:
            raise ServeError(f"cannot load '{name}': max_loras={self.max_loras} adapters "
                             f"are loaded; unload one first")

    def _attach(self, family: str, name: str, path: Path, method: str) -> None:
        from . import bottleneck

        holder = self.families.get(family)
        try:
            if method == "Adapter":
                self.families[family] = bottleneck.load(copy.deepcopy(self.base), path).eval()
            elif holder is None:
                from peft import PeftModel

                self.families[family] = PeftModel.from_pretrained(
                    copy.deepcopy(self.base), str(path), adapter_name=name).eval()
            else:
                holder.load_adapter(str(path), adapter_name=name)
        except Exception as exc:  # noqa: BLE001 - a bad artifact is the client's error
            # Whatever was half-injected goes: the family's tree holds only loaded adapters.
            if holder is not None and name in getattr(holder, "peft_config", {}):
                try:
                    holder.delete_adapter(name)
                except Exception:  # noqa: BLE001 - a tree we cannot clean is rebuilt
                    self.families.pop(family, None)
            gc.collect()
            if isinstance(exc, ServeError):
                raise
            raise ServeError(f"cannot load adapter '{name}': {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from None

    def unload(self, name: str) -> str:
        with self.lock:
            loaded = self.adapters.pop(name, None)
            if loaded is None:
                raise ServeError(f"The lora adapter '{name}' cannot be found.", 404,
                                 "NotFoundError")
            holder = self.families.get(loaded.family)
            others = [a for a in self.adapters.values() if a.family == loaded.family]
            if not others:
                self.families.pop(loaded.family, None)
            elif hasattr(holder, "delete_adapter"):
                holder.set_adapter(others[0].name)
                holder.delete_adapter(name)
        if loaded.owned is not None:
            shutil.rmtree(loaded.owned, ignore_errors=True)
            self.disk.release(loaded.owned_bytes)
        gc.collect()
        self.metrics.set("kubetune_serve_adapters_loaded", len(self.adapters))
        self.metrics.set("kubetune_serve_adapter_cache_bytes", self.disk.used)
        return f"Success: LoRA adapter '{name}' removed successfully."

    def models(self) -> dict:
        data = [{"id": self.served_name, "object": "model", "created": self.created,
                 "owned_by": "kubetune", "root": self.model_uri, "parent": None,
                 "max_model_len": self.max_model_len}]
        data += [{"id": a.name, "object": "model", "created": a.created, "owned_by": "kubetune",
                  "root": a.path, "parent": self.served_name} for a in self.adapters.values()]
        return {"object": "list", "data": data}

    # ---- generation ------------------------------------------------------------------------
    def _activate(self, model: str):
        """The module tree serving `model`, with its adapter active (call under the lock)."""
        if model == self.served_name:
            return self.base
        if model not in self.adapters:
            raise ServeError(f"The model `{model}` does not exist.", 404, "NotFoundError")
        loaded = self.adapters[model]
        target = self.families[loaded.family]
        if hasattr(target, "set_adapter") and loaded.method != "Adapter":
            target.set_adapter(model)
        return target

    def _run(self, model: str, req: decoding.Request, on_text=None,
             cancel: threading.Event | None = None) -> decoding.Outcome:
        """Generate under the lock (one adapter active at a time) and count it."""
        self.metrics.inc("kubetune_serve_requests_running", 1)
        try:
            with self.lock:
                target = self._activate(model)
                full_forward = (model != self.served_name
                                and self.adapters[model].method == "PrefixTuning")
                try:
                    outcome = decoding.run(target, self.tokenizer, req, full_forward, on_text,
                                           cancel)
                except Exception as exc:  # noqa: BLE001 - reported to the client
                    raise ServeError(f"generation failed: {type(exc).__name__}: {exc}", 500,
                                     "InternalServerError") from None
        finally:
            self.metrics.inc("kubetune_serve_requests_running", -1)
        self.metrics.finished(model, outcome.finish, outcome.prompt_tokens,
                              len(outcome.token_ids))
        return outcome

    def generate(self, model: str, req: decoding.Request) -> tuple:
        outcome = self._run(model, req)
        text = self.tokenizer.decode(outcome.token_ids, skip_special_tokens=True)
        return text, outcome.finish, outcome.prompt_tokens, len(outcome.token_ids)

    def stream(self, model: str, req: decoding.Request):
        """Yield text pieces as they are generated, then (finish, prompt tokens, completion
        tokens). Generation runs in its own thread and queues its pieces, so a slow reader
        never holds the lock; closing this generator (the client went away) stops the
        generation at its next token."""
        pieces: queue.Queue = queue.Queue()
        cancel = threading.Event()
        end = object()

        def work() -> None:
            try:
                outcome = self._run(model, req, pieces.put, cancel)
                pieces.put((outcome.finish, outcome.prompt_tokens, len(outcome.token_ids)))
            except ServeError as exc:
                pieces.put(exc)
            finally:
                pieces.put(end)

        threading.Thread(target=work, daemon=True, name=f"generate-{model}").start()
        try:
            while (item := pieces.get()) is not end:
                if isinstance(item, ServeError):
                    raise item
                yield item
        finally:
            cancel.set()

    def _prompt(self, body: dict, chat: bool) -> str:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ServeError("'messages' must be a non-empty list")
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ServeError("'prompt' must be a string")
        return prompt

    def _fits(self, prompt: str) -> None:
        """Refuse, before tokenising, a prompt too long to fit whatever its tokens."""
        if len(prompt) > self.max_model_len * self.max_token_chars:
            raise ServeError(f"This model's maximum context length is {self.max_model_len} "
                             f"tokens; the prompt's {len(prompt)} characters cannot fit.")

    def _request(self, body: dict, prompt: str) -> decoding.Request:
        try:
            max_tokens = int(16 if body.get("max_tokens") is None else body["max_tokens"])
            temperature = float(body.get("temperature") or 0.0)
        except (TypeError, ValueError):
            raise ServeError("'max_tokens' must be an integer and 'temperature' a number") \
                from None
        if max_tokens < 1:
            raise ServeError(f"'max_tokens' must be at least 1, got {max_tokens}")
        if max_tokens > self.max_model_len:
            raise ServeError(f"'max_tokens' {max_tokens} is greater than the model's maximum "
                             f"context length {self.max_model_len}")
        self._fits(prompt)
        inputs = self.tokenizer(prompt, return_tensors="pt")  # once: checked, then generated
        prompt_tokens = int(inputs["input_ids"].shape[1])
        if prompt_tokens + max_tokens > self.max_model_len:
            raise ServeError(f"This model's maximum context length is {self.max_model_len} "
                             f"tokens. However, you requested {prompt_tokens + max_tokens} "
                             f"tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                             f"completion). Please reduce the length of the messages or "
                             f"completion.")
        if temperature < 0:
            raise ServeError(f"'temperature' must be >= 0, got {temperature}")
        return decoding.Request(inputs, max_tokens, temperature, bool(body.get("ignore_eos")))

    def completion_chunks(self, body: dict, chat: bool):
        """`stream: true`: OpenAI/vLLM server-sent-event chunks, as dicts."""
        model = body.get("model") or self.served_name
        prompt = self._prompt(body, chat)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else
                         {"content": piece} if piece is not None else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": finish,
                          "logprobs": None}
            return {"id": ident, "object": kind, "created": created, "model": model,
                    "choices": [choice]}

        pieces = self.stream(model, self._request(body, prompt))
        try:
            first = next(pieces)  # errors (unknown model) surface before any byte is sent
            if chat:
                yield chunk(None, None, first=True)
            while not isinstance(first, tuple):
                yield chunk(first, None)
                first = next(pieces)
        finally:
            pieces.close()  # the client went away: stop generating
        finish, prompt_tokens, completion_tokens = first
        last = chunk(None, finish)
        last["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}
        yield last

    def completion(self, body: dict, chat: bool) -> dict:
        model = body.get("model") or self.served_name
        prompt = self._prompt(body, chat)
        text, finish, prompt_tokens, completion_tokens = self.generate(
            model, self._request(body, prompt))
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "finish_reason": finish} if chat else
                  {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model, "choices": [choice],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}


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


def make_handler(server: AdapterServer, api_key: str | None = None,
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
                self._send(200, server.models())
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
                    self._send(200, server.load(body.get("lora_name", ""),
                                                body.get("lora_path", "")), text=True)
                elif self.path == "/v1/unload_lora_adapter":
                    self._send(200, server.unload(body.get("lora_name", "")), text=True)
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
    server = AdapterServer(base_path, served_name or model_uri, max_loras, max_lora_rank,
                           cache_dir / "adapters", model_uri=model_uri,
                           max_virtual_tokens=max_virtual_tokens,
                           max_cache_bytes=max_cache_bytes)
    httpd = ThreadingHTTPServer((host, port), make_handler(server, api_key, max_request_bytes))
    httpd.daemon_threads = True
    httpd.adapter_server = server  # type: ignore[attr-defined]
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
