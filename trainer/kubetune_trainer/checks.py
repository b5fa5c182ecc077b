"""Runtime checks for the common silent failures of fine-tuning.

Each returns a list of (severity, message); "error" stops the run before training, "warning"
is reported as an event (or stops it with checks.failOnWarnings)."""

from __future__ import annotations

Finding = tuple[str, str]


def pad_is_eos(tokenizer) -> list[Finding]:
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
        return [("warning", "pad token equals EOS: EOS is masked out of the labels with the "
                            "padding, so the model may never learn to stop; set a distinct "
                            "pad token")]
    return []


def double_bos(tokenizer, sample_text: str) -> list[Finding]:
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer(sample_text)["input_ids"]
    if len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        return [("warning", "sequences start with two BOS tokens (the chat template adds one "
                            "and the tokenizer another): set add_special_tokens=False or fix "
                            "the template")]
    return []


def assistant_mask(tokenizer, messages: list[dict]) -> list[Finding]:
    from .chatmask import MaskError, tokenize

    try:
        out = tokenize(tokenizer, messages)
    except MaskError as exc:
        return [("error", str(exc))]
    except Exception as exc:  # noqa: BLE001
        return [("error", f"the chat template cannot render the data: {exc}")]
    if sum(out["assistant_masks"]) == 0:
        return [("error", "assistantOnlyLoss: the assistant-token mask is empty (no assistant "
                          "turn with content in the first record), so no token would be "
                          "trained; check the data or turn assistantOnlyLoss off")]
    return []


def truncation(lengths: list[int], max_length: int, limit: float) -> list[Finding]:
    if not lengths:
        return []
    rate = sum(1 for n in lengths if n > max_length) / len(lengths)
    if rate > limit:
        return [("error", f"{rate:.0%} of training sequences are longer than maxLength "
                          f"{max_length} and would be truncated (limit {limit:.0%}); raise "
                          f"dataset.maxLength or shorten the data")]
    if rate > 0:
        return [("warning", f"{rate:.1%} of training sequences are truncated to {max_length} "
                            f"tokens")]
    return []


def embeddings_saved(modules_to_save: list[str] | None, model) -> list[Finding]:
    if not modules_to_save:
        return []
    heavy = [m for m in modules_to_save if "embed" in m or "lm_head" in m or "wte" in m]
    if not heavy:
        return []
    params = sum(p.numel() for n, p in model.named_parameters()
                 if any(n.endswith(h + ".weight") or f".{h}." in n for h in heavy))
    return [("warning", f"modulesToSave includes {heavy}: the adapter stores these in full "
                        f"(~{params * 4 / 1e6:.1f} MB in fp32), not as a low-rank update")]
