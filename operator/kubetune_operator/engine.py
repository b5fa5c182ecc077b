"""Client of the serving engines' runtime LoRA API (vLLM's, which `kubetune serve` speaks too):
GET /v1/models, POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter. Stdlib HTTP, short
timeouts, one clear error line."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


class EngineError(RuntimeError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Engine:
    def __init__(self, ip: str, port: int, api_key: str | None = None,
                 timeout: float = 5.0, load_timeout: float = 300.0):
        self.base = f"http://{ip}:{port}"
        self.api_key = api_key
        self.timeout, self.load_timeout = timeout, load_timeout

    def _call(self, path: str, body: dict | None, timeout: float, base: str | None = None):
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request((base or self.base) + path, data=data, headers=headers,
                                     method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.read().decode()
        except urllib.error.HTTPError as exc:
            raw = exc.read().decode(errors="replace")
            try:
                message = json.loads(raw).get("message") or raw
            except (ValueError, AttributeError):
                message = raw
            reason = "Unauthorized" if exc.code in (401, 403) else \
                ("SyncFailed" if path == "/v1/sync" else "LoadRejected")
            raise EngineError(reason, f"{path}: HTTP {exc.code}: {str(message)[:1000]}") from None
        except (OSError, TimeoutError) as exc:
            raise EngineError("Unreachable", f"{self.base}{path}: {exc}") from None

    def models(self) -> tuple[dict[str, str], str | None]:
        """(adapter id → root, the base model's root)."""
        raw = self._call("/v1/models", None, self.timeout)
        try:
            data = json.loads(raw)["data"]
        except (ValueError, KeyError, TypeError):
            raise EngineError("BadResponse", f"/v1/models: not a model list: {raw[:200]}") \
                from None
        adapters = {m["id"]: m.get("root") or "" for m in data if m.get("parent")}
        base = next((m.get("root") for m in data if not m.get("parent")), None)
        return adapters, base

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
