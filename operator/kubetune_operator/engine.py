"""Client of the serving engines' runtime LoRA API (vLLM's, which `kubetune serve` speaks too):
GET /v1/models, POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter, and one-token
POST /v1/completions with log-probs for the behaviour probe.

A serving pod is not trusted: every call has a total deadline (a watchdog closes the socket, so
a server that drips one byte at a time cannot hold it longer), the response is read up to a size
cap, redirects are refused (the API key never travels to another host), and only a bounded,
printable excerpt of an error body reaches status and Events."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from urllib.parse import urlsplit

from kubetune.behaviour import top_entries

MAX_RESPONSE_BYTES = 1024 * 1024
MAX_MESSAGE = 300  # characters of an engine's error message kept for status and Events


class EngineError(RuntimeError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _printable(text: str) -> str:
    flat = "".join(c if c.isprintable() else " " for c in text)
    return flat[:MAX_MESSAGE] + ("…" if len(flat) > MAX_MESSAGE else "")


class Engine:
    def __init__(self, ip: str, port: int, api_key: str | None = None,
                 timeout: float = 5.0, load_timeout: float = 300.0,
                 max_response_bytes: int = MAX_RESPONSE_BYTES):
        self.base = f"http://{ip}:{port}"
        self.api_key = api_key
        self.timeout, self.load_timeout = timeout, load_timeout
        self.max_response_bytes = max_response_bytes

    def _exchange(self, base: str, path: str, data: bytes | None, timeout: float):
        """(status, body) of one request, all of it within `timeout` seconds."""
        url = urlsplit(base)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        watchdog = threading.Timer(timeout, expire)
        watchdog.daemon = True
        watchdog.start()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            conn.request("POST" if data is not None else "GET", path, body=data,
                         headers=headers)
            resp = conn.getresponse()
            body = resp.read(self.max_response_bytes + 1)
            if len(body) > self.max_response_bytes:
                raise EngineError("BadResponse", f"{base}{path}: response larger than "
                                                 f"{self.max_response_bytes} bytes")
            if expired.is_set():
                raise OSError("deadline")
            return resp.status, body
        except EngineError:
            raise
        except (OSError, http.client.HTTPException) as exc:
            if expired.is_set():
                raise EngineError("Timeout", f"{base}{path}: no complete answer within "
                                             f"{timeout:g} s") from None
            raise EngineError("Unreachable", f"{base}{path}: {_printable(str(exc))}") from None
        finally:
            watchdog.cancel()
            conn.close()

    def _call(self, path: str, body: dict | None, timeout: float, base: str | None = None):
        data = json.dumps(body).encode() if body is not None else None
        status, raw = self._exchange(base or self.base, path, data, timeout)
        if 300 <= status < 400:
            raise EngineError("BadResponse", f"{path}: HTTP {status}: redirects are not "
                                             f"followed")
        if status >= 400:
            try:
                message = json.loads(raw).get("message")
            except (ValueError, AttributeError):
                message = None
            text = _printable(message) if isinstance(message, str) else \
                f"(no JSON error message; {len(raw)} bytes)"
            reason = "Unauthorized" if status in (401, 403) else \
                "InsufficientStorage" if status == 507 else \
                ("SyncFailed" if path == "/v1/sync" else "LoadRejected")
            raise EngineError(reason, f"{path}: HTTP {status}: {text}")
        return raw.decode(errors="replace")

    def models(self) -> tuple[dict[str, str], str | None]:
        """(adapter id → root, the base model's root)."""
        raw = self._call("/v1/models", None, self.timeout)
        try:
            data = json.loads(raw)["data"]
            if not isinstance(data, list):
                raise TypeError
            adapters = {str(m["id"]): str(m.get("root") or "") for m in data
                        if m.get("parent")}
            base = next((str(m.get("root")) for m in data if not m.get("parent")), None)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise EngineError("BadResponse", f"/v1/models: not a model list: "
                                             f"{_printable(raw[:200])}") from None
        return adapters, base

    def probe(self, name: str, text: str, k: int):
        """The top-k log-probs of the next token after `text` from adapter `name` (one greedy
        token through the completions API: vLLM's and OpenAI's shape)."""
        raw = self._call("/v1/completions", {"model": name, "prompt": text, "max_tokens": 1,
                                             "temperature": 0, "logprobs": k},
                         self.timeout * 6)
        try:
            top = json.loads(raw)["choices"][0]["logprobs"]["top_logprobs"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            top = None
        entries = top_entries(top)
        if entries is None:
            raise EngineError("BadResponse", f"/v1/completions: no top log-probs in the "
                                             f"answer: {_printable(raw[:200])}")
        return entries

    def load(self, name: str, path: str) -> None:
        self._call("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path},
                   self.load_timeout)

    def sync(self, port: int, uri: str, digest: str | None, path: str) -> None:
        """Ask the adapter-sync sidecar (vLLM pods) to put the verified artifact at `path`."""
        base = self.base.rsplit(":", 1)[0] + f":{port}"
        self._call("/v1/sync", {"uri": uri, "sha256": digest, "path": path}, self.load_timeout,
                   base=base)

    def unload(self, name: str) -> None:
        try:
            self._call("/v1/unload_lora_adapter", {"lora_name": name}, self.timeout * 6)
        except EngineError as exc:
            if "HTTP 404" not in str(exc):
                raise  # already gone is what we wanted
