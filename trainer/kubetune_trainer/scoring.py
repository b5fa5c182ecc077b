"""Task score: what the model answers, not only its loss.

After training, the eval split's prompts are answered by greedy generation and compared with
the references: ``exactMatch`` (the answer, stripped, equals the reference) and
``normalizedMatch`` (equal after lower-casing and removing punctuation, articles and extra
white space, as SQuAD scores answers). Chat records are scored on their last assistant turn
(the conversation before it is the prompt); prompt/completion records on the completion; plain
text has no reference and is not scored.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    text = text.lower().translate(PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


@dataclass
class Example:
    prompt: object  # a list of chat messages, or a string
    reference: str


def examples(dataset, fmt: str, limit: int) -> list[Example]:
    """The scorable records of `dataset` (first `limit`)."""
    out: list[Example] = []
    if dataset is None or fmt == "text":
        return out
    for record in dataset:
        if len(out) >= limit:
            break
        if fmt == "messages":
            messages = record["messages"]
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"),
                       default=None)
            if last is None or last == 0:
                continue
            out.append(Example(messages[:last], messages[last]["content"]))
        else:
            out.append(Example(record["prompt"], record["completion"]))
    return out


def _encode(tokenizer, example: Example) -> str:
    if isinstance(example.prompt, list):
        return tokenizer.apply_chat_template(example.prompt, tokenize=False,
                                             add_generation_prompt=True)
    return example.prompt


def generate(model, tokenizer, prompts: list[Example], max_new_tokens: int,
             batch_size: int = 16) -> list[str]:
    """Greedy answers, one per example, decoded without special tokens and stripped."""
    import torch

    chat = bool(prompts) and isinstance(prompts[0].prompt, list)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            texts = [_encode(tokenizer, e) for e in batch]
            encoded = tokenizer(texts, return_tensors="pt", padding=True,
                                add_special_tokens=not chat).to(device)
            with torch.no_grad():
                output = model.generate(**encoded, max_new_tokens=max_new_tokens,
                                        do_sample=False, num_beams=1,
                                        pad_token_id=tokenizer.pad_token_id,
                                        eos_token_id=tokenizer.eos_token_id)
            width = encoded["input_ids"].shape[1]
            answers.extend(tokenizer.decode(row[width:], skip_special_tokens=True).strip()
                           for row in output)
    finally:
        tokenizer.padding_side = side
        if was_training:
            model.train()
    return answers


def answer_budget(tokenizer, items: list[Example], ceiling: int) -> int:
    """New tokens to generate: the longest reference plus a margin, at most `ceiling`."""
    longest = max((len(tokenizer(e.reference, add_special_tokens=False)["input_ids"])
                   for e in items), default=1)
    return max(1, min(ceiling, longest + 8))


def score(model, tokenizer, dataset, fmt: str, max_samples: int, max_new_tokens: int,
          keep: int = 5) -> dict | None:
    """exactMatch, normalizedMatch and scoreSamples, plus the first `keep` answers."""
    items = examples(dataset, fmt, max_samples)
    if not items:
        return None
    answers = generate(model, tokenizer, items, answer_budget(tokenizer, items, max_new_tokens))
    exact = sum(a == e.reference.strip() for a, e in zip(answers, items))
    loose = sum(normalise(a) == normalise(e.reference) for a, e in zip(answers, items))
    return {"exactMatch": round(exact / len(items), 4),
            "normalizedMatch": round(loose / len(items), 4),
            "scoreSamples": len(items),
            "answers": [{"prompt": _shown(e.prompt), "reference": e.reference, "answer": a}
                        for a, e in zip(answers[:keep], items[:keep])]}


def _shown(prompt) -> str:
    if isinstance(prompt, list):
        return next((m["content"] for m in reversed(prompt) if m["role"] == "user"),
                    prompt[-1]["content"])
    return prompt
