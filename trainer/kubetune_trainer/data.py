"""Load training data (JSONL or Parquet), detect its format, map fields to TRL's columns.

TRL's SFTTrainer takes ``messages`` (chat), ``prompt``/``completion`` or ``text`` columns, and its
DPOTrainer ``prompt``/``chosen``/``rejected`` (strings, or chat message lists); this module turns
the user's records into exactly one of those shapes, or fails with one line naming the file, the
record and the cause."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kubetune.api.finetunejob import DatasetSpec

FORMAT_COLUMNS = {"messages": ("messages",), "preference": ("prompt", "chosen", "rejected"),
                  "promptCompletion": ("prompt", "completion"), "text": ("text",)}
# The format each objective trains on (anything else is refused with a pointer to the other).
OBJECTIVE_FORMATS = {"dpo": ("preference",), "sft": ("messages", "promptCompletion", "text")}


class DataError(ValueError):
    """Bad training data; one line naming the cause."""


@dataclass
class LoadedData:
    format: str
    train: object  # datasets.Dataset
    eval: object | None
    digest_source: list[Path]


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json", ".parquet"))
        if not files:
            raise DataError(f"{path}: no .jsonl or .parquet files")
        return files
    if not path.exists():
        raise DataError(f"{path}: file not found")
    return [path]


def read_records(path: Path) -> list[dict]:
    records: list[dict] = []
    for file in _files(path):
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                records.extend(pq.read_table(file).to_pylist())
            except Exception as exc:  # noqa: BLE001
                raise DataError(f"{file.name}: not a readable Parquet file ({exc})") from None
            continue
        with open(file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{file.name} line {number}: invalid JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{file.name} line {number}: expected a JSON object")
                records.append(record)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _mapping(spec: DatasetSpec) -> dict[str, str]:
    fields = spec.fields
    return {"messages": (fields and fields.messages) or "messages",
            "prompt": (fields and fields.prompt) or "prompt",
            "completion": (fields and fields.completion) or "completion",
            "text": (fields and fields.text) or "text",
            "chosen": (fields and fields.chosen) or "chosen",
            "rejected": (fields and fields.rejected) or "rejected"}


def detect_format(records: list[dict], spec: DatasetSpec) -> str:
    mapping = _mapping(spec)
    if spec.format != "auto":
        needed = [mapping[c] for c in FORMAT_COLUMNS[spec.format]]
        if not any(all(n in r for n in needed) for r in records[:100]):
            seen = sorted({k for r in records[:100] for k in r})
            raise DataError(f"dataset has none of the mapped fields {needed} for format "
                            f"{spec.format} (fields seen: {', '.join(seen) or 'none'})")
        return spec.format
    first = records[0]
    for fmt in FORMAT_COLUMNS:  # preference before promptCompletion: both have a prompt
        if all(mapping[c] in first for c in FORMAT_COLUMNS[fmt]):
            return fmt
    seen = sorted(first)
    raise DataError("cannot detect the dataset format: records have none of "
                    f"{mapping['messages']!r}, {mapping['prompt']!r}+{mapping['completion']!r}, "
                    f"{mapping['prompt']!r}+{mapping['chosen']!r}+{mapping['rejected']!r}, "
                    f"{mapping['text']!r} (fields seen: {', '.join(seen) or 'none'}); set "
                    f"dataset.format and dataset.fields")


def _messages(value, field: str, index: int) -> list[dict]:
    if not isinstance(value, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise DataError(f"record {index}: {field!r} must be a list of {{role, content}} objects")
    return [{"role": m["role"], "content": str(m["content"])} for m in value]


def _turns(value, role: str, field: str, index: int) -> list[dict]:
    """A chat field as messages; a plain string becomes one message of `role`."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _messages(value, field, index)


def preference_pairs(records: list[dict], spec: DatasetSpec) -> list[dict]:
    """prompt/chosen/rejected records. Chat when the first record holds a message list (then
    plain strings become a user prompt and assistant answers, so every record has one shape);
    plain text otherwise, where a message list is an error."""
    mapping = _mapping(spec)
    keys = ("prompt", "chosen", "rejected")
    chat = any(isinstance(records[0].get(mapping[k]), list) for k in keys)
    out = []
    for index, record in enumerate(records):
        missing = [mapping[k] for k in keys if mapping[k] not in record]
        if missing:
            raise DataError(f"record {index}: missing field {missing[0]!r}")
        values = {k: record[mapping[k]] for k in keys}
        if chat:
            out.append({"prompt": _turns(values["prompt"], "user", mapping["prompt"], index),
                        **{k: _turns(values[k], "assistant", mapping[k], index)
                           for k in ("chosen", "rejected")}})
        elif any(isinstance(v, list) for v in values.values()):
            raise DataError(f"record {index}: chat messages, but the first record is plain "
                            f"text (use one shape for every record)")
        else:
            out.append({k: str(v) for k, v in values.items()})
        if out[-1]["chosen"] == out[-1]["rejected"]:
            raise DataError(f"record {index}: chosen and rejected are the same answer")
    return out


def normalise(records: list[dict], fmt: str, spec: DatasetSpec) -> list[dict]:
    if fmt == "preference":
        return preference_pairs(records, spec)
    mapping = _mapping(spec)
    out = []
    for index, record in enumerate(records):
        try:
            if fmt == "messages":
                out.append({"messages": _messages(record[mapping["messages"]],
                                                  mapping["messages"], index)})
            elif fmt == "promptCompletion":
                out.append({"prompt": str(record[mapping["prompt"]]),
                            "completion": str(record[mapping["completion"]])})
            else:
                out.append({"text": str(record[mapping["text"]])})
        except KeyError as exc:
            raise DataError(f"record {index}: missing field {exc.args[0]!r}") from None
    return out


def check_objective(fmt: str, objective: str) -> None:
    """The data fits the objective: preference pairs for dpo, anything else for sft."""
    if fmt in OBJECTIVE_FORMATS[objective]:
        return
    if objective == "dpo":
        raise DataError(f"objective dpo needs preference records (prompt, chosen, rejected), "
                        f"but the dataset is {fmt}; map the fields with dataset.fields")
    raise DataError("the dataset is preference data (prompt, chosen, rejected): train it with "
                    "objective dpo")


def load(spec: DatasetSpec, train_path: Path, eval_path: Path | None, seed: int,
         objective: str = "sft") -> LoadedData:
    from datasets import Dataset

    records = read_records(train_path)
    fmt = detect_format(records, spec)
    check_objective(fmt, objective)
    if spec.assistant_only_loss and fmt != "messages":
        raise DataError(f"assistantOnlyLoss needs chat data, but the dataset is {fmt}")
    train = Dataset.from_list(normalise(records, fmt, spec))
    evaluation = None
    if eval_path is not None:
        eval_records = read_records(eval_path)
        eval_format = detect_format(eval_records, spec) if spec.format == "auto" else fmt
        check_objective(eval_format, objective)
        evaluation = Dataset.from_list(normalise(eval_records, eval_format, spec))
    elif spec.eval_fraction:
        split = train.train_test_split(test_size=spec.eval_fraction, seed=seed)
        train, evaluation = split["train"], split["test"]
    files = _files(train_path) + (_files(eval_path) if eval_path else [])
    return LoadedData(format=fmt, train=train, eval=evaluation, digest_source=files)
