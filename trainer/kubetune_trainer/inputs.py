"""A run's inputs: the model and datasets fetched, the tokenizer and the records loaded.

Training (`train`) and the method comparison (`compare`) prepare a run the same way; this module
is that one way, so a comparison measures what a FineTuneJob would train.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kubetune.trainerconfig import TrainerConfig
from kubetune.storage import Storage


@dataclass
class Paths:
    model: Path
    train: Path
    eval: Path | None


def fetch(cfg: TrainerConfig, storage: Storage) -> Paths:
    """Resolves (downloading or converting once, then from the cache) the model and the data."""
    from . import sources

    cache = Path(cfg.cache_dir)
    train, evaluation = cfg.data.train, cfg.data.eval
    return Paths(
        model=sources.resolve_model(cfg.model.uri, cfg.model.revision, cache, storage),
        train=sources.resolve_data(train.uri, cache, storage, train.sha256),
        eval=sources.resolve_data(evaluation.uri, cache, storage, evaluation.sha256)
        if evaluation else None)


def tokenizer(cfg: TrainerConfig, model_path: Path):
    """The model's tokenizer with the job's chat template and a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path),
                                        trust_remote_code=cfg.model.trust_remote_code)
    if cfg.data.chat_template:
        tok.chat_template = cfg.data.chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def prepare(cfg: TrainerConfig, paths: Paths):
    """Seeds the run, then returns (tokenizer, loaded data)."""
    from transformers import set_seed

    from . import data

    set_seed(cfg.training.seed)
    return tokenizer(cfg, paths.model), data.load(cfg.data, paths.train, paths.eval,
                                                  cfg.training.seed, cfg.objective)
