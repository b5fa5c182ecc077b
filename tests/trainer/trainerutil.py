"""Readers of a trainer run's event file and termination summary."""

import json
from pathlib import Path


def events(cfg) -> list[dict]:
    path = Path(cfg.logging.file)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def summary(cfg) -> dict:
    return json.loads(Path(cfg.logging.termination_log).read_text())
