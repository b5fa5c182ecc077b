"""Settings of `kubetune api`: where files and outputs go, which base models the API offers,
and what every job it creates starts from."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

SERVING_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")


@dataclass(frozen=True)
class Settings:
    storage_uri: str
    """s3://bucket/prefix: uploaded files go to <uri>/files/, job outputs to <uri>/jobs/."""
    models: dict[str, str]
    """The base models offered: OpenAI model name -> baseModel.uri."""
    key_namespace: str = "default"
    """Namespace of the API-key Secrets."""
    s3_endpoint: str | None = None
    s3_region: str | None = None
    runtime: str | None = None
    """A ClusterFineTuneRuntime every job names (spec.runtimeRef)."""
    serve_deployment: str | None = None
    """The `kubetune serve` Deployment (in the key's namespace) adapters are loaded into."""
    spec_defaults: dict[str, Any] = field(default_factory=dict)
    """A FineTuneJob spec fragment under the mapped fields (resources, createAdapter, ...)."""
    max_file_bytes: int = 64 * 1024 * 1024
    max_micro_batch: int = 8
    """Largest perDeviceBatchSize a batch_size maps to (the rest is gradient accumulation)."""
    deadline_seconds: float = 20.0
    """Total deadline of one Kubernetes or S3 call."""


def parse_models(pairs: list[str]) -> dict[str, str]:
    """`NAME=URI` pairs (the CLI's --model)."""
    models = {}
    for pair in pairs:
        name, sep, uri = pair.partition("=")
        if not sep or not SERVING_NAME.match(name) or not uri:
            raise ValueError(f"--model {pair!r}: expected NAME=URI (NAME: letters, digits, "
                             ". _ -)")
        models[name] = uri
    return models
