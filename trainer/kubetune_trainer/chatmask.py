"""Assistant-only loss for any prefix-preserving chat template, with or without
``{% generation %}`` markers.

Real templates (SmolLM2's ChatML, Llama 3's, Mistral's) have no generation markers, so
transformers' ``return_assistant_tokens_mask`` returns an empty mask for them. We find each
assistant turn by rendering: the text of conversation[:i] with the generation prompt is a
prefix of conversation[:i+1]; what the turn adds (its content and end-of-turn token, without
trailing whitespace) is the span to train on. Tokens whose characters overlap a span are
trained; every other token (system, user, role headers) is masked. The result is a tokenized
dataset (``input_ids`` + ``assistant_masks``) that TRL turns into labels, truncates and packs.
"""

from __future__ import annotations


class MaskError(ValueError):
    """The template cannot be masked this way; one line naming the cause."""


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    full = _render(tokenizer, messages, False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], True) if index else ""
        upto = _render(tokenizer, messages[:index + 1], False)
        if not upto.startswith(before) or not full.startswith(upto):
            raise MaskError("assistantOnlyLoss: the chat template is not prefix-preserving (a "
                            "conversation's rendering does not start with the rendering of its "
                            "first turns), so assistant turns cannot be located; set "
                            "dataset.chatTemplate or turn assistantOnlyLoss off")
        end = len(upto.rstrip())
        start = len(before)
        if index == 0:  # no generation prompt to strip: skip to the turn's content
            found = upto.find(message["content"])
            start = found if found >= 0 else 0
        if end > start:
            spans.append((start, end))
    return full, spans


def tokenize(tokenizer, messages: list[dict]) -> dict:
    """input_ids and assistant_masks (1 = trained) of one conversation."""
    full, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = []
    for start, end in encoded["offset_mapping"]:
        mask.append(int(any(start < s_end and end > s_start for s_start, s_end in spans)))
    return {"input_ids": list(encoded["input_ids"]), "assistant_masks": mask}


def tokenize_dataset(dataset, tokenizer):
    """A datasets.Dataset of {messages} → {input_ids, assistant_masks}."""
    return dataset.map(lambda record: tokenize(tokenizer, record["messages"]),
                       remove_columns=dataset.column_names)


def trained_text(tokenizer, messages: list[dict]) -> list[str]:
    """The trained pieces of a conversation, decoded run by run (for checks and tests)."""
    out = tokenize(tokenizer, messages)
    pieces, current = [], []
    for token, bit in zip(out["input_ids"], out["assistant_masks"]):
        if bit:
            current.append(token)
        elif current:
            pieces.append(tokenizer.decode(current))
            current = []
    if current:
        pieces.append(tokenizer.decode(current))
    return pieces
