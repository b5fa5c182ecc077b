"""`kubetune api`'s options (flags, with environment variables as defaults for the chart)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

from .config import Settings, parse_models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--host", default=env("KUBETUNE_API_HOST", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(env("KUBETUNE_API_PORT", "8000")))
    parser.add_argument("--storage", default=env("KUBETUNE_API_STORAGE"),
                        help="s3://bucket/prefix for uploaded files and job outputs (required)")
    parser.add_argument("--model", action="append", default=None,
                        help="NAME=URI: a base model the API offers (repeatable; default "
                             "$KUBETUNE_API_MODELS, comma-separated)")
    parser.add_argument("--key-namespace", default=env("KUBETUNE_API_KEY_NAMESPACE")
                        or env("POD_NAMESPACE") or "default",
                        help="namespace of the API-key Secrets (label kubetune.io/api-key)")
    parser.add_argument("--s3-endpoint", default=env("AWS_ENDPOINT_URL"))
    parser.add_argument("--s3-region", default=env("AWS_DEFAULT_REGION"))
    parser.add_argument("--runtime", default=env("KUBETUNE_API_RUNTIME") or None,
                        help="ClusterFineTuneRuntime every job uses (spec.runtimeRef)")
    parser.add_argument("--serve-deployment", default=env("KUBETUNE_API_SERVE_DEPLOYMENT")
                        or None, help="kubetune serve Deployment the adapters are loaded into")
    parser.add_argument("--spec-defaults", type=Path, default=env("KUBETUNE_API_SPEC_DEFAULTS"),
                        help="YAML FineTuneJob spec fragment every job starts from")
    parser.add_argument("--max-file-bytes", type=int,
                        default=int(env("KUBETUNE_API_MAX_FILE_BYTES", str(64 * 1024 * 1024))))
    parser.add_argument("--max-micro-batch", type=int, default=8,
                        help="largest perDeviceBatchSize a batch_size maps to")
    parser.add_argument("--deadline", type=float, default=20.0,
                        help="seconds one Kubernetes or S3 call may take")
    parser.add_argument("--kubeconfig", default=env("KUBECONFIG"),
                        help="default: $KUBECONFIG, else the in-cluster account")


def settings_from(args: argparse.Namespace) -> Settings:
    if not args.storage:
        raise ValueError("--storage s3://bucket/prefix is required")
    pairs = args.model if args.model is not None else \
        [p for p in os.environ.get("KUBETUNE_API_MODELS", "").split(",") if p]
    defaults = {}
    if args.spec_defaults:
        defaults = yaml.safe_load(Path(args.spec_defaults).read_text()) or {}
        if not isinstance(defaults, dict):
            raise ValueError(f"{args.spec_defaults}: a mapping (a FineTuneJob spec fragment)")
    return Settings(storage_uri=args.storage, models=parse_models(pairs),
                    key_namespace=args.key_namespace, s3_endpoint=args.s3_endpoint,
                    s3_region=args.s3_region, runtime=args.runtime,
                    serve_deployment=args.serve_deployment, spec_defaults=defaults,
                    max_file_bytes=args.max_file_bytes, max_micro_batch=args.max_micro_batch,
                    deadline_seconds=args.deadline)


def run(args: argparse.Namespace) -> int:
    from .server import serve

    return serve(settings_from(args), args.host, args.port, args.kubeconfig)
