"""structlog: JSON in clusters, readable on a terminal; stdlib logging (kopf) routed through it."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(json_logs: bool | None = None, level: int = logging.INFO) -> None:
    json_logs = (not sys.stderr.isatty()) if json_logs is None else json_logs
    shared = [structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
              structlog.processors.TimeStamper(fmt="iso")]
    renderer = structlog.processors.JSONRenderer() if json_logs else \
        structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(processors=[*shared, structlog.processors.format_exc_info, renderer],
                        wrapper_class=structlog.make_filtering_bound_logger(level),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    formatter = structlog.stdlib.ProcessorFormatter(
        processor=renderer, foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared])
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
