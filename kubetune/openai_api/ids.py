"""Identifiers of the API's objects. Every id from a request is checked against its pattern
before it is used anywhere (an object name, an S3 key): ids are never used raw."""

from __future__ import annotations

import hashlib
import re
import secrets

from .errors import invalid

JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")
FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
EVENT_ID = re.compile(r"^ftevent-[0-9a-f]{24}$")
CHECKPOINT_ID = re.compile(r"^ftckpt_[0-9a-f]{24}$")
PATTERNS = {"job": JOB_ID, "file": FILE_ID, "event": EVENT_ID, "checkpoint": CHECKPOINT_ID}


def new_job_id() -> str:
    """96 random bits: the FineTuneJob's name, so a job is found by name in the key's own
    namespace and never by a search across namespaces."""
    return f"ftjob-{secrets.token_hex(12)}"


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def derived(prefix: str, *parts: object) -> str:
    """A stable id for an object rebuilt on every read (events, checkpoints)."""
    digest = hashlib.sha256("\x00".join(str(p) for p in parts).encode()).hexdigest()
    return f"{prefix}{digest[:24]}"


def checked(kind: str, value: object, param: str | None = None) -> str:
    """`value` when it is a well-formed id of `kind`, else a 400 naming the parameter (the
    bad value is not echoed: it may be anything)."""
    if not isinstance(value, str) or not PATTERNS[kind].match(value):
        raise invalid(f"invalid {kind} id", param, f"invalid_{kind}_id")
    return value
