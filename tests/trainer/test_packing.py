"""Packing (spec.dataset.packing) on the built-in tiny Llama: a packed batch computes what its
sequences compute alone (logits, labels and loss), eval is unchanged by it, and where packed
sequences would attend to each other (prefix tuning) the trainer measures that and trains
unpacked with a warning. Runs locally (file:// output), no S3."""

from pathlib import Path

import pytest

from trainerutil import events, summary
from kubetune_trainer import packing, train

pytestmark = pytest.mark.trainer

LORA = {"type": "LoRA", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
CACHE = Path.home() / ".cache" / "kubetune" / "test-cache"


def _config(tmp_path, method=LORA, *, training=None, data=None, checks=None, name="run"):
    from kubetune.trainerconfig import TrainerConfig

    return TrainerConfig.model_validate({
        "model": {"uri": "builtin://tiny-llama", "revision": "v1"},
        "data": {"train": {"uri": "builtin://tiny-chat"}, "format": "messages",
                 "maxLength": 128, "packing": True, "assistantOnlyLoss": True,
                 "evalFraction": 0.1, **(data or {})},
        "method": method,
        "training": {"maxSteps": 4, "learningRate": 0.005, "perDeviceBatchSize": 4,
                     "gradientAccumulationSteps": 1, "loggingSteps": 1, **(training or {})},
        "evaluation": {"score": False}, "checks": checks or {},
        "output": {"uri": f"file://{tmp_path}/{name}-out"},
        "logging": {"stdout": False, "file": str(tmp_path / f"{name}-events.jsonl"),
                    "termination_log": str(tmp_path / f"{name}-termination.log")},
        "cache_dir": str(CACHE), "work_dir": str(tmp_path / f"{name}-work")})


def _setup(cfg):
    """(tokenizer, loaded data, adapted model) as the trainer builds them."""
    from kubetune.storage import Storage
    from kubetune_trainer import inputs, methods

    paths = inputs.fetch(cfg, Storage())
    tokenizer, loaded = inputs.prepare(cfg, paths)
    model = methods.apply_method(cfg, methods.load_base(cfg, paths.model, "cpu"))
    return tokenizer, loaded, model


def _segments(position_ids: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each sequence in a padding-free row: positions restart at 0."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return list(zip(starts, starts[1:]))


def _expected_labels(tokenizer, records) -> dict[tuple, list[int]]:
    """input_ids → labels as an unpacked run trains them (assistant tokens only)."""
    from kubetune_trainer import chatmask

    out = {}
    for record in records:
        tokens = chatmask.tokenize(tokenizer, record["messages"])
        out[tuple(tokens["input_ids"])] = [t if bit else -100 for t, bit in
                                           zip(tokens["input_ids"], tokens["assistant_masks"])]
    return out


def test_a_packed_batch_computes_what_its_sequences_compute_alone(tmp_path):
    import torch
    import torch.nn.functional as F

    cfg = _config(tmp_path)
    tokenizer, loaded, model = _setup(cfg)
    decided, findings = packing.decide(cfg, model, tokenizer)
    assert (decided.mode, findings) == (packing.PACKED, [])
    assert decided.attention == "sdpa" and decided.isolation_error <= packing.TOLERANCE["fp32"]
    trainer = train._trainer(cfg, model, tokenizer, loaded, "cpu", tmp_path, packing=decided)
    assert trainer.args.packing and trainer.args.padding_free
    assert trainer.args.packing_strategy == "bfd" and trainer.args.eval_packing is False

    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    segments = _segments(batch["position_ids"][0].tolist())
    assert len(segments) >= 8, "a batch of 4 packed rows of 128 holds many ~40-token chats"
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()

    # Labels: each segment is a whole training conversation with the labels an unpacked run
    # gives it, except the first token (never predicted: nothing before it in its sequence).
    expected = _expected_labels(tokenizer, loaded.train)
    for start, end in segments:
        assert tuple(ids[start:end]) in expected, "packing cut or mixed a conversation"
        assert labels[start:end] == [-100] + expected[tuple(ids[start:end])][1:]

    model.train()  # as in training (LoRA dropout 0: deterministic)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=batch["input_ids"][:, s:e], use_cache=False)
                           .logits[0] for s, e in segments])
        # What packing without isolation ("wrapped") computes: one causal row over everything.
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      attention_mask=torch.ones_like(batch["input_ids"]),
                      use_cache=False).logits[0]
        trained_loss = trainer.compute_loss(model, dict(batch))
    scale = float(alone.abs().max())
    assert float((packed - alone).abs().max()) / scale < 1e-4
    assert float((leaky - alone).abs().max()) / scale > 1e-2, "the check could not fail"

    # The loss the trainer optimises on the packed batch is the token-mean loss of the
    # sequences run alone.
    per_token = []
    for s, e in segments:
        target = torch.tensor(labels[s + 1:e])
        per_token.append(F.cross_entropy(alone[s:e - 1], target, ignore_index=-100,
                                         reduction="none")[target != -100])
    separate_loss = torch.cat(per_token).mean()
    assert abs(float(trained_loss) - float(separate_loss)) < 1e-5


def test_eval_loss_is_the_same_with_and_without_packing(tmp_path):
    """Eval batches are not BFD-packed: the same sequences, flattened without padding, give the
    eval loss an unpacked run gives (the same model, both trainers)."""
    cfg = _config(tmp_path)
    unpacked_cfg = _config(tmp_path, data={"packing": False}, name="unpacked")
    tokenizer, loaded, model = _setup(cfg)
    decided, _ = packing.decide(cfg, model, tokenizer)
    packed = train._trainer(cfg, model, tokenizer, loaded, "cpu", tmp_path / "a",
                            packing=decided)
    plain = train._trainer(unpacked_cfg, model, tokenizer, loaded, "cpu", tmp_path / "b")
    assert not plain.args.packing and not plain.args.padding_free
    eval_batch = next(iter(packed.get_eval_dataloader()))
    assert "attention_mask" not in eval_batch  # padding-free collator on eval too
    a, b = packed.evaluate()["eval_loss"], plain.evaluate()["eval_loss"]
    assert abs(a - b) < 1e-5, (a, b)


def test_packed_run_records_its_mode_and_packs_the_data(tmp_path):
    """One epoch each way: packing cuts the steps (several chats per row) and the summary and
    manifest say which packing ran on which attention."""
    import json

    runs = {}
    for name, packed in (("packed", True), ("unpacked", False)):
        cfg = _config(tmp_path, training={"maxSteps": None, "epochs": 1}, name=name,
                      data={"packing": packed})
        assert train.run(cfg) == 0, summary(cfg)
        runs[name] = summary(cfg)["metrics"]
    record = runs["packed"]["packing"]
    assert (record["requested"], record["mode"], record["attention"]) == \
        (True, "bfd-padding-free", "sdpa") and record["isolationError"] < 1e-4
    assert runs["unpacked"]["packing"] == {"requested": False, "mode": "off"}
    assert runs["packed"]["steps"] * 2 < runs["unpacked"]["steps"], runs
    # The same conversations are trained (BFD drops none at this maxLength): same token count.
    assert runs["packed"]["numTokens"] == runs["unpacked"]["numTokens"], runs
    manifest = json.loads((tmp_path / "packed-out/adapter/manifest.json").read_text())
    assert manifest["metrics"]["packing"]["mode"] == "bfd-padding-free"


def test_prefix_tuning_is_measured_to_leak_and_trains_unpacked_with_a_warning(tmp_path):
    """Prefix tuning passes its virtual tokens as a KV cache, which turns transformers' packed
    mask off: the probe sees the leak, and the run trains unpacked, saying so."""
    cfg = _config(tmp_path, {"type": "PrefixTuning", "prefix": {"numVirtualTokens": 4}},
                  name="prefix")
    assert train.run(cfg) == 0, summary(cfg)
    record = summary(cfg)["metrics"]["packing"]
    assert record["requested"] and record["mode"] == "off" and record["isolationError"] > 0.01
    warnings = [e["message"] for e in events(cfg) if e["event"] == "check"]
    assert any("dataset.packing: not packing" in m and "PrefixTuning" in m and
               "attend to each other" in m for m in warnings), warnings


def test_fail_on_warnings_refuses_a_packing_that_would_leak(tmp_path):
    cfg = _config(tmp_path, {"type": "PrefixTuning", "prefix": {"numVirtualTokens": 4}},
                  checks={"fail_on_warnings": True}, name="strict")
    assert train.run(cfg) == train.EXIT_INVALID
    assert "dataset.packing" in summary(cfg)["message"]
