"""Prometheus metrics of `kubetune serve` (GET /metrics), in the text exposition format.

Written out by hand: the trainer image carries no Prometheus client, and these are a few
counters and gauges.
"""

from __future__ import annotations

import threading
from collections import defaultdict

_HELP = {
    "kubetune_serve_requests_total": ("counter", "Finished completion requests by model and "
                                                 "finish reason (stop, length, cancelled)"),
    "kubetune_serve_request_errors_total": ("counter", "Requests answered with an error, by "
                                                       "HTTP status"),
    "kubetune_serve_prompt_tokens_total": ("counter", "Prompt tokens processed, by model"),
    "kubetune_serve_generation_tokens_total": ("counter", "Tokens generated, by model"),
    "kubetune_serve_adapter_loads_total": ("counter", "Adapter load calls by result"),
    "kubetune_serve_adapters_loaded": ("gauge", "Adapters loaded now"),
    "kubetune_serve_adapter_cache_bytes": ("gauge", "Bytes of s3:// adapter downloads held "
                                                    "(limit: --max-cache-bytes)"),
    "kubetune_serve_requests_running": ("gauge", "Completion requests being answered now"),
}


def escape(value) -> str:
    """A label value in the text exposition format: backslash, quote and newline escaped, so
    a crafted adapter or model name cannot add lines or series of its own."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: tuple) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{escape(v)}"' for k, v in labels)
    return "{" + ",".join(escaped) + "}"


class ServeMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple, float]] = defaultdict(dict)

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values[name][tuple(sorted(labels.items()))] = value

    def finished(self, model: str, finish: str, prompt_tokens: int, tokens: int) -> None:
        self.inc("kubetune_serve_requests_total", model=model, finish=finish)
        self.inc("kubetune_serve_prompt_tokens_total", prompt_tokens, model=model)
        self.inc("kubetune_serve_generation_tokens_total", tokens, model=model)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, (kind, text) in _HELP.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                series = self._values.get(name) or ({(): 0} if kind == "gauge" else {})
                for labels, value in sorted(series.items()):
                    number = int(value) if float(value).is_integer() else value
                    lines.append(f"{name}{_labels(labels)} {number}")
        return "\n".join(lines) + "\n"
