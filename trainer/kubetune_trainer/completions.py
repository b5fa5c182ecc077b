"""OpenAI's completions and chat completions over the adapter registry, in vLLM's shapes:
prompts checked against the model's context before they are tokenised, `max_tokens`,
`temperature`, vLLM's `ignore_eos`, streaming as server-sent-event chunks, and log-probs
(`logprobs` / `top_logprobs`, of the raw logits: what the operator's behaviour probe reads)."""

from __future__ import annotations

import time
import uuid

from . import decoding
from .registry import AdapterRegistry, ServeError

MAX_LOGPROBS = 20  # top log-probs per token a client may ask for (OpenAI's limit)


class Completions:
    def __init__(self, registry: AdapterRegistry):
        self.registry = registry

    @property
    def metrics(self):
        return self.registry.metrics

    def _prompt(self, body: dict, chat: bool) -> str:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ServeError("'messages' must be a non-empty list")
            return self.registry.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ServeError("'prompt' must be a string")
        return prompt

    def _fits(self, prompt: str) -> None:
        """Refuse, before tokenising, a prompt too long to fit whatever its tokens."""
        limit = self.registry.max_model_len
        if len(prompt) > limit * self.registry.max_token_chars:
            raise ServeError(f"This model's maximum context length is {limit} "
                             f"tokens; the prompt's {len(prompt)} characters cannot fit.")

    def _request(self, body: dict, prompt: str) -> decoding.Request:
        try:
            max_tokens = int(16 if body.get("max_tokens") is None else body["max_tokens"])
            temperature = float(body.get("temperature") or 0.0)
        except (TypeError, ValueError):
            raise ServeError("'max_tokens' must be an integer and 'temperature' a number") \
                from None
        if max_tokens < 1:
            raise ServeError(f"'max_tokens' must be at least 1, got {max_tokens}")
        if max_tokens > self.registry.max_model_len:
            raise ServeError(f"'max_tokens' {max_tokens} is greater than the model's maximum "
                             f"context length {self.registry.max_model_len}")
        self._fits(prompt)
        # tokenized once: checked, then generated
        inputs = self.registry.tokenizer(prompt, return_tensors="pt")
        prompt_tokens = int(inputs["input_ids"].shape[1])
        limit = self.registry.max_model_len
        if prompt_tokens + max_tokens > limit:
            raise ServeError(f"This model's maximum context length is {limit} "
                             f"tokens. However, you requested {prompt_tokens + max_tokens} "
                             f"tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                             f"completion). Please reduce the length of the messages or "
                             f"completion.")
        if temperature < 0:
            raise ServeError(f"'temperature' must be >= 0, got {temperature}")
        return decoding.Request(inputs, max_tokens, temperature, bool(body.get("ignore_eos")),
                                self._logprobs(body))

    @staticmethod
    def _logprobs(body: dict) -> int | None:
        """How many top log-probs per token the client asked for: `logprobs: k` (completions)
        or `logprobs: true` + `top_logprobs: k` (chat); None when not asked."""
        chat = "messages" in body
        asked = body.get("top_logprobs", 0) if chat else body.get("logprobs")
        if chat and not body.get("logprobs"):
            return None
        if asked is None or asked is False:
            return None
        if type(asked) is not int or not 0 <= asked <= MAX_LOGPROBS:
            raise ServeError(f"'{'top_logprobs' if chat else 'logprobs'}' must be an integer "
                             f"from 0 to {MAX_LOGPROBS}")
        if body.get("stream"):
            raise ServeError("log-probs are not supported with 'stream': true")
        return asked

    def completion_chunks(self, body: dict, chat: bool):
        """`stream: true`: OpenAI/vLLM server-sent-event chunks, as dicts."""
        model = body.get("model") or self.registry.served_name
        prompt = self._prompt(body, chat)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else
                         {"content": piece} if piece is not None else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": finish,
                          "logprobs": None}
            return {"id": ident, "object": kind, "created": created, "model": model,
                    "choices": [choice]}

        pieces = self.registry.stream(model, self._request(body, prompt))
        try:
            first = next(pieces)  # errors (unknown model) surface before any byte is sent
            if chat:
                yield chunk(None, None, first=True)
            while not isinstance(first, tuple):
                yield chunk(first, None)
                first = next(pieces)
        finally:
            pieces.close()  # the client went away: stop generating
        finish, prompt_tokens, completion_tokens = first
        last = chunk(None, finish)
        last["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}
        yield last

    def completion(self, body: dict, chat: bool) -> dict:
        model = body.get("model") or self.registry.served_name
        prompt = self._prompt(body, chat)
        req = self._request(body, prompt)
        outcome = self.registry.run(model, req)
        text = self.registry.tokenizer.decode(outcome.token_ids, skip_special_tokens=True)
        finish, prompt_tokens = outcome.finish, outcome.prompt_tokens
        completion_tokens = len(outcome.token_ids)
        logprobs = self._logprobs_body(outcome, chat) if outcome.logprobs is not None else None
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "logprobs": logprobs, "finish_reason": finish} if chat else
                  {"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs})
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model, "choices": [choice],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}


    def _logprobs_body(self, outcome: decoding.Outcome, chat: bool) -> dict:
        """OpenAI's shapes: chat `{content: [{token, logprob, bytes, top_logprobs}]}`;
        completions `{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}`."""
        def text(token: int) -> str:
            return self.registry.tokenizer.decode([token])
        if chat:
            return {"content": [
                {"token": text(tok), "logprob": lp, "bytes": list(text(tok).encode()),
                 "top_logprobs": [{"token": text(i), "logprob": v,
                                   "bytes": list(text(i).encode())} for i, v in top]}
                for tok, (lp, top) in zip(outcome.token_ids, outcome.logprobs)]}
        tokens = [text(tok) for tok in outcome.token_ids]
        offsets, at = [], 0
        for piece in tokens:
            offsets.append(at)
            at += len(piece)
        return {"tokens": tokens, "token_logprobs": [lp for lp, _ in outcome.logprobs],
                "top_logprobs": [{text(i): v for i, v in top} for _, top in outcome.logprobs],
                "text_offset": offsets}
