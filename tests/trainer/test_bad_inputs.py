"""Bad inputs end with one clear error line naming the cause and a non-zero exit code."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.trainer


def _run(tmp_path, env_extra, data_uri, fields=None, output=None, fmt="messages"):
    import os

    config = {
        "model": {"uri": "builtin://tiny-llama", "revision": "v1"},
        "data": {"train": {"uri": data_uri}, "format": fmt, "maxLength": 128,
                 **({"fields": fields} if fields else {})},
        "method": {"type": "LoRA"},
        "training": {"maxSteps": 2, "perDeviceBatchSize": 2},
        "output": {"uri": output or f"file://{tmp_path}/out"},
        "logging": {"stdout": False, "termination_log": str(tmp_path / "term.log")},
        "cache_dir": str(tmp_path / "cache"), "work_dir": str(tmp_path / "work"),
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "-m", "kubetune_trainer", "train", "--config",
                           str(path)], capture_output=True, text=True,
                          env={**os.environ, **env_extra}, timeout=300)
    errors = [line for line in proc.stderr.splitlines()
              if line.startswith("kubetune-trainer: error:")]
    return proc.returncode, errors, json.loads((tmp_path / "term.log").read_text()) \
        if (tmp_path / "term.log").exists() else None


def test_missing_file(tmp_path):
    code, errors, term = _run(tmp_path, {}, f"file://{tmp_path}/nope.jsonl")
    assert code == 2
    assert len(errors) == 1 and "nope.jsonl: not found" in errors[0]
    assert term["status"] == "Failed" and term["reason"] == "InvalidInput"


def test_corrupt_jsonl_line(tmp_path):
    data = tmp_path / "train.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "hello"}]})
    data.write_text(f"{good}\n{good}\n{{not json\n{good}\n")
    code, errors, _ = _run(tmp_path, {}, f"file://{data}")
    assert code == 2
    assert errors == [errors[0]] and "train.jsonl line 3: invalid JSON" in errors[0]


def test_dataset_with_none_of_the_mapped_fields(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    code, errors, _ = _run(tmp_path, {}, f"file://{data}", fields={"messages": "dialogue"})
    assert code == 2
    assert len(errors) == 1
    assert "none of the mapped fields ['dialogue']" in errors[0]
    assert "fields seen: answer, question" in errors[0]


def test_s3_access_denied(tmp_path, s3_server):
    env = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "wrong"}
    code, errors, term = _run(tmp_path, env, f"s3://{s3_server.bucket}/data/train.jsonl")
    assert code != 0
    assert len(errors) == 1 and "S3 access denied" in errors[0]
    assert "s3://kubetune/data/train.jsonl" in errors[0]


def test_invalid_config_is_one_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"model": {"uri": "builtin://tiny-llama"}}))
    proc = subprocess.run([sys.executable, "-m", "kubetune_trainer", "train", "--config",
                           str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("kubetune-trainer: error: invalid config") == 1
