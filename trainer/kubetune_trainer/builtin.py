"""Built-in base model and data for demos and tests: no hub download.

``builtin://tiny-llama`` is a 2-layer Llama (hidden 64) with a byte-level BPE tokenizer trained
here on the built-in corpus and a chat template (with ``{% generation %}`` markers, so
assistant-only loss works). ``builtin://tiny-chat`` is a deterministic chat dataset with a
learnable pattern; ``builtin://tiny-text`` and ``builtin://tiny-pc`` are the same facts as plain
text and prompt/completion records. Everything is built deterministically (fixed seeds), so the
same URI gives the same weights on every machine; revision ``v1`` names this recipe.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

MODELS = ("tiny-llama",)
DATASETS = ("tiny-chat", "tiny-text", "tiny-pc")
REVISION = "v1"

OBJECTS = ["apple", "sky", "grass", "banana", "snow", "coal", "rose", "ocean", "lemon", "cherry",
           "cloud", "leaf", "tomato", "night", "sun", "carrot", "plum", "milk", "ash", "lime"]
COLORS = ["red", "blue", "green", "yellow", "white", "black", "red", "blue", "yellow", "red",
          "white", "green", "red", "black", "yellow", "orange", "purple", "white", "grey", "green"]
PROMPTS = ["What color is the {o}?", "Tell me the color of the {o}.", "Which color does the {o} have?",
           "Name the color of the {o}.", "{o}: what color?"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]


def chat_records(n: int = 400, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        k = rng.randrange(len(OBJECTS))
        obj, color = OBJECTS[k], COLORS[k]
        prompt = rng.choice(PROMPTS).format(o=obj)
        records.append({"messages": [
            {"role": "system", "content": "You answer with one short sentence."},
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": f"The {obj} is {color}."}]})
    return records


def text_records(n: int = 400, seed: int = 0) -> list[dict]:
    return [{"text": f"{r['messages'][1]['content']} {r['messages'][2]['content']}"}
            for r in chat_records(n, seed)]


def prompt_completion_records(n: int = 400, seed: int = 0) -> list[dict]:
    return [{"prompt": r["messages"][1]["content"], "completion": " " + r["messages"][2]["content"]}
            for r in chat_records(n, seed)]


def write_dataset(name: str, directory: Path) -> Path:
    """Write a built-in dataset as JSONL and return the file."""
    if name not in DATASETS:
        raise ValueError(f"unknown built-in dataset builtin://{name} (known: {', '.join(DATASETS)})")
    records = {"tiny-chat": chat_records, "tiny-text": text_records,
               "tiny-pc": prompt_completion_records}[name]()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _corpus() -> list[str]:
    lines = []
    for r in chat_records(2000, seed=1):
        for m in r["messages"]:
            lines.append(m["content"])
    lines += ["user assistant system " + " ".join(OBJECTS + COLORS)]
    return lines


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=SPECIAL[4:])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 512
    return fast


def build_model(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, rms_norm_eps=1e-6)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def build_base_model(name: str, directory: Path) -> Path:
    """Save the built-in model (weights + tokenizer) into `directory` and return it."""
    if name not in MODELS:
        raise ValueError(f"unknown built-in model builtin://{name} (known: {', '.join(MODELS)})")
    marker = directory / ".complete"
    if marker.exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    marker.write_text(REVISION)
    return directory
