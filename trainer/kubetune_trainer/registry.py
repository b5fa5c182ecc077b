"""`kubetune serve`'s adapter registry: the base model read once, adapters of every method we
train loaded and unloaded at run time (local folders, or s3:// artifacts verified against their
manifest and held to a disk budget), and generation with one of them.

Methods that rewrite modules in place cannot share one module tree, so each method family
(LoRA, IA3, prefix tuning, and each bottleneck adapter) gets its own in-memory copy of the base,
made on first use. Generation is serialised by a lock: an adapter is activated and used by one
request at a time, so concurrent requests for different adapters never see each other's
weights. A streamed request generates in its own thread into a queue (a slow reader never holds
the lock) and stops when it is closed.
"""

from __future__ import annotations

import copy
import gc
import json
import queue
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import decoding
from .servemetrics import ServeMetrics

MAX_ADAPTER_BYTES = 8 * 1024 ** 3  # an s3:// adapter larger than this is refused unread
MAX_CACHE_BYTES = 32 * 1024 ** 3  # all s3:// adapter downloads together (--max-cache-bytes)


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


class AdapterRegistry:
    """The loaded adapters over one base model, and generation with one of them."""

    def __init__(self, base_path: Path, served_name: str, max_loras: int = 8,
                 max_lora_rank: int = 64, cache_dir: Path = Path("/tmp/kubetune-serve"),
                 model_uri: str | None = None, max_virtual_tokens: int = 128,
                 max_cache_bytes: int = MAX_CACHE_BYTES):
        from transformers import AutoTokenizer

        from .diskbudget import DiskBudget
        from .loading import load_base

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
        self.base = load_base(base_path)  # the one inference loading path (loading.py)
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
        """The adapter's folder, and the bytes reserved in the disk budget for it (s3://).
        `s3://…@sha256:<manifest digest>` pins the manifest: another one at that URI (swapped
        after the operator verified it) is refused, not loaded."""
        if lora_path.startswith("s3://"):
            from kubetune.artifacts import VerificationError, split_pin, verify
            from .diskbudget import BudgetExceeded
            from kubetune.storage import StorageError, shared

            dest = self.cache_dir / uuid.uuid4().hex
            held = [0]

            def reserve(total: int) -> None:
                self.disk.reserve(total)
                held[0] = total
            try:
                uri, pinned = split_pin(lora_path)
                verify(uri, shared(), dest, expected_sha256=pinned,
                       max_bytes=MAX_ADAPTER_BYTES, reserve=reserve)
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
        from .loading import attach

        holder = self.families.get(family)
        try:
            if method == "Adapter" or holder is None:  # a family's first: the shared path
                self.families[family] = attach(copy.deepcopy(self.base), path, name).eval()
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

    def run(self, model: str, req: decoding.Request, on_text=None,
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
                outcome = self.run(model, req, pieces.put, cancel)
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
