"""Helpers for trainer tests: configs that train the built-in tiny Llama and publish to the
test S3."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def make_config(tmp_path, s3_env):
    from kubetune.trainerconfig import TrainerConfig

    def make(method: dict, *, training: dict | None = None, data: dict | None = None,
             merge: dict | None = None, checkpointing: dict | None = None,
             output: str | None = None, name: str = "run",
             extra: dict | None = None) -> TrainerConfig:
        out = output or f"s3://{s3_env.bucket}/tests/{name}-{secrets.token_hex(4)}"
        return TrainerConfig.model_validate({
            "model": {"uri": "builtin://tiny-llama", "revision": "v1"},
            "data": {"train": {"uri": "builtin://tiny-chat"}, "format": "messages",
                     "maxLength": 128, **(data or {})},
            "method": method,
            "training": {"maxSteps": 20, "learningRate": 0.005, "perDeviceBatchSize": 8,
                         "gradientAccumulationSteps": 1, "loggingSteps": 2, **(training or {})},
            "checkpointing": {"everySteps": 10, "keepLast": 2, **(checkpointing or {})},
            "output": {"uri": out},
            "merge": merge,
            "logging": {"stdout": False, "file": str(tmp_path / f"{name}-events.jsonl"),
                        "termination_log": str(tmp_path / f"{name}-termination.log")},
            "cache_dir": str(Path.home() / ".cache" / "kubetune" / "test-cache"),
            "work_dir": str(tmp_path / f"{name}-work"),
            **(extra or {}),
        })

    return make
