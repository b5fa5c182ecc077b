"""GGUF files as base models: de-quantize once, cache as a transformers folder (safetensors).

transformers loads a GGUF (with the `gguf` package) by de-quantizing every tensor, which takes
about a minute for a 135M model on two CPU cores. We do it once per GGUF content: the folder is
keyed by the file's sha256, written under a temporary name and renamed when complete, so an
interrupted or concurrent conversion never leaves a half-written model that a later run trusts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

RECIPE = "1"  # bump when the conversion below changes what it writes
MARKER = ".kubetune-gguf.json"


class GGUFError(ValueError):
    """The file is not a GGUF that transformers can load; one line naming the cause."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def converted(gguf: Path, cache: Path) -> Path:
    """The transformers folder for `gguf`, converting on the first call for this content."""
    import json

    gguf = Path(gguf)
    if not gguf.is_file():
        raise GGUFError(f"{gguf}: not found")
    with open(gguf, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise GGUFError(f"{gguf.name}: not a GGUF file (no GGUF magic number)")
    digest = file_sha256(gguf)
    target = cache / "gguf" / f"{digest[:32]}-r{RECIPE}"
    marker = target / MARKER
    if marker.exists():
        return target
    scratch = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    print(f"Converting {gguf.name} to a float32 transformers model (once per machine, about "
          f"a minute on 2 cores)", file=sys.stderr, flush=True)
    try:
        with _progress_as_configured():
            _convert(gguf, scratch)
        (scratch / MARKER).write_text(json.dumps({"gguf": gguf.name, "sha256": digest,
                                                  "recipe": RECIPE}))
        try:
            scratch.rename(target)
        except OSError:  # another process finished first: its copy is identical
            if not marker.exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


@contextmanager
def _progress_as_configured():
    """transformers' GGUF loader draws its own tqdm bar, ignoring transformers' progress-bar
    switch: honour the switch (the quiet quickstart turns it off)."""
    from functools import partial

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    original = getattr(gguf_utils, "tqdm", None)
    if original is None or hf_logging.is_progress_bar_enabled():
        yield
        return
    gguf_utils.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - unsupported architecture, truncated file: one line
        raise GGUFError(f"{gguf.name}: transformers cannot load this GGUF "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})"
                        ) from None
    # The de-quantized weights are plain float32 tensors; only the loader's marker says "gguf".
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Padding must not be the end-of-turn token (it would be masked out of the labels with the
    # padding, and the model would not learn to stop): use the unknown token when it is distinct.
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        spare = tokenizer.unk_token
        if spare is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = spare
            model.config.pad_token_id = tokenizer.pad_token_id
            if model.generation_config is not None:
                model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
