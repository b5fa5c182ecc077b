"""Uploaded training files: OpenAI's JSONL formats checked line by line and converted to the
records our trainer reads, at upload time, so a job never starts on data that cannot train.

- supervised (chat): `{"messages": [{"role", "content"}, ...]}`, stored as our format
  `messages` (the same shape, with unknown keys dropped);
- dpo (preference): `{"input": {"messages": [...]}, "preferred_output": [...],
  "non_preferred_output": [...]}`, stored as our format `preference`
  (`{"prompt": [...], "chosen": [...], "rejected": [...]}`).
"""

from __future__ import annotations

import json
from typing import Any

from .errors import invalid

ROLES = ("system", "user", "assistant")
MAX_LINE_ERRORS = 1  # the first bad line is reported; OpenAI's validator also stops early
MAX_MESSAGES = 1024
MAX_CONTENT_CHARS = 1_000_000
KINDS = {"chat": "messages", "preference": "preference"}  # file kind -> dataset.format


def convert_jsonl(data: bytes) -> tuple[str, bytes, int]:
    """Check an uploaded JSONL file and convert it: (kind, converted JSONL, records).
    Every line must be of one kind; the first bad line is named in a 400."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(f"the file is not UTF-8 (byte {exc.start})", "file") from None
    kind, out = None, []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        record = _parse_line(line, number)
        line_kind = "preference" if "input" in record else "chat"
        if kind is not None and line_kind != kind:
            raise invalid(f"line {number}: a {line_kind} record in a file of {kind} records; "
                          "use one format per file", "file")
        kind = line_kind
        out.append(_chat(record, number) if kind == "chat" else _preference(record, number))
    if not out:
        raise invalid("the file holds no records (JSONL: one JSON object per line)", "file")
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out).encode()
    return kind, body, len(out)


def _parse_line(line: str, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise invalid(f"line {number}: not JSON ({exc.msg})", "file") from None
    if not isinstance(record, dict):
        raise invalid(f"line {number}: a JSON object is expected", "file")
    return record


def _chat(record: dict, number: int) -> dict[str, Any]:
    if "tools" in record or "functions" in record:
        raise invalid(f"line {number}: tools and functions are not supported", "file")
    messages = _messages(record.get("messages"), number, "messages")
    if not any(m["role"] == "assistant" for m in messages):
        raise invalid(f"line {number}: messages need at least one assistant message", "file")
    return {"messages": messages}


def _preference(record: dict, number: int) -> dict[str, Any]:
    given = record.get("input")
    if not isinstance(given, dict):
        raise invalid(f"line {number}: input must be an object with messages", "file")
    if given.get("tools"):
        raise invalid(f"line {number}: tools are not supported", "file")
    prompt = _messages(given.get("messages"), number, "input.messages")
    if prompt[-1]["role"] == "assistant":
        raise invalid(f"line {number}: input.messages must not end with an assistant message",
                      "file")
    chosen = _answer(record.get("preferred_output"), number, "preferred_output")
    rejected = _answer(record.get("non_preferred_output"), number, "non_preferred_output")
    if chosen == rejected:
        raise invalid(f"line {number}: preferred_output and non_preferred_output are the "
                      "same answer", "file")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _answer(value: Any, number: int, field: str) -> list[dict[str, str]]:
    messages = _messages(value, number, field)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise invalid(f"line {number}: {field} must be exactly one assistant message", "file")
    return messages


def _messages(value: Any, number: int, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise invalid(f"line {number}: {field} must be a non-empty list of messages", "file")
    if len(value) > MAX_MESSAGES:
        raise invalid(f"line {number}: {field} has more than {MAX_MESSAGES} messages", "file")
    return [_message(m, number, f"{field}[{i}]") for i, m in enumerate(value)]


def _message(message: Any, number: int, where: str) -> dict[str, str]:
    if not isinstance(message, dict):
        raise invalid(f"line {number}: {where} must be an object", "file")
    role = message.get("role")
    if role not in ROLES:
        raise invalid(f"line {number}: {where}.role must be one of {', '.join(ROLES)}", "file")
    if message.get("tool_calls") or message.get("function_call"):
        raise invalid(f"line {number}: {where}: tool calls are not supported", "file")
    if message.get("weight", 1) != 1:
        raise invalid(f"line {number}: {where}.weight 0 (skip this turn) is not supported; "
                      "every assistant turn is trained", "file")
    return {"role": role, "content": _content(message.get("content"), number, where)}


def _content(content: Any, number: int, where: str) -> str:
    """A string, or OpenAI's list of text parts (joined): images and audio cannot train a
    text model."""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text"
                   and isinstance(p.get("text"), str) for p in content):
            raise invalid(f"line {number}: {where}.content: only text parts are supported",
                          "file")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str) or not content:
        raise invalid(f"line {number}: {where}.content must be a non-empty string", "file")
    if len(content) > MAX_CONTENT_CHARS:
        raise invalid(f"line {number}: {where}.content is longer than {MAX_CONTENT_CHARS} "
                      "characters", "file")
    return content
