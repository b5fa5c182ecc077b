"""Token generation for `kubetune serve`: one call that produces a request's tokens into a
queue as text pieces, stoppable from another thread.

Two paths: transformers' ``generate()`` (LoRA, IA3, bottleneck adapters, the base) streamed
through a ``TextStreamer``; and a plain forward-per-token loop for PEFT prefix tuning, whose
virtual tokens transformers 5's ``generate()`` silently drops (it takes the cache under a new
name).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable


@dataclass
class Request:
    inputs: dict  # the tokenized prompt (input_ids, attention_mask as tensors)
    max_tokens: int
    temperature: float = 0.0
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k log-probs per generated token (of the raw logits)


@dataclass
class Outcome:
    token_ids: list[int]
    prompt_tokens: int
    finish: str  # "stop" (end of sequence), "length" (max_tokens) or "cancelled"
    # Per generated token: (its log-prob, [(token id, log-prob)] top-k), when asked for.
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


def token_logprobs(logits, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-prob and the top-k, from one position's raw logits."""
    import torch

    logp = torch.log_softmax(logits.float().reshape(-1), dim=-1)
    values, ids = logp.topk(k) if k else (logp[:0], logp[:0].long())
    return float(logp[token]), [(int(i), float(v)) for v, i in zip(values, ids)]


def decode_steps(model, inputs, max_tokens: int, temperature: float, eos: int | None,
                 cancel: threading.Event | None = None, on_logits=None):
    """Token-by-token decoding with a full forward per step, yielding each new token id
    (`on_logits(logits, token)` sees each step's raw logits)."""
    import torch

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(max_tokens):
        if cancel is not None and cancel.is_set():
            return
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1, :].float()
        if temperature and temperature > 0:
            token = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1)
        else:
            token = logits.argmax(dim=-1, keepdim=True)
        if on_logits is not None:
            on_logits(logits[0], int(token[0, 0]))
        ids = torch.cat([ids, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        yield int(token[0, 0])
        if eos is not None and int(token[0, 0]) == eos:
            return


def run(model, tokenizer, req: Request, full_forward: bool,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None) -> Outcome:
    """Generate for `req`; every finalized piece of text goes to `on_text` as it is made
    (their concatenation is the decoded completion). Setting `cancel` stops at the next token."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

    cancel = cancel or threading.Event()
    eos = tokenizer.eos_token_id
    inputs = req.inputs
    n_prompt = int(inputs["input_ids"].shape[1])
    logprobs: list | None = [] if req.logprobs is not None else None

    def keep(logits, token: int) -> None:
        logprobs.append(token_logprobs(logits, token, req.logprobs))
    with torch.no_grad():
        if full_forward:
            produced: list[int] = []
            shown = ""
            for token in decode_steps(model, inputs, req.max_tokens, req.temperature,
                                      None if req.ignore_eos else eos, cancel,
                                      keep if logprobs is not None else None):
                produced.append(token)
                if on_text is not None:
                    text = tokenizer.decode(produced, skip_special_tokens=True)
                    piece, shown = text[len(shown):], text
                    if piece:
                        on_text(piece)
        else:
            class Cancelled(StoppingCriteria):
                def __call__(self, input_ids, scores, **kwargs):
                    return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool)

            class Pieces(TextStreamer):
                def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                    if text:
                        on_text(text)

            kwargs = {"max_new_tokens": req.max_tokens, "pad_token_id": tokenizer.pad_token_id,
                      "stopping_criteria": StoppingCriteriaList([Cancelled()])}
            if req.ignore_eos:
                kwargs["min_new_tokens"] = req.max_tokens  # EOS is masked until the end
            if req.temperature and req.temperature > 0:
                kwargs.update(do_sample=True, temperature=req.temperature)
            else:
                kwargs.update(do_sample=False)
            if on_text is not None:
                kwargs["streamer"] = Pieces(tokenizer, skip_prompt=True,
                                            skip_special_tokens=True)
            if logprobs is not None:  # the raw logits, before temperature or any processor
                kwargs.update(output_logits=True, return_dict_in_generate=True)
            out = model.generate(**inputs, **kwargs)
            sequence = out.sequences[0] if logprobs is not None else out[0]
            produced = sequence[n_prompt:].tolist()
            if logprobs is not None:
                for step, token in zip(out.logits, produced):
                    keep(step[0], token)
    if cancel.is_set():
        finish = "cancelled"
    elif produced and produced[-1] == eos and not req.ignore_eos:
        finish = "stop"
    else:
        finish = "length"
    return Outcome(produced, n_prompt, finish, logprobs)
