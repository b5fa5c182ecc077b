"""Runtime checks for the silent failures."""

import pytest

from kubetune_trainer import builtin, checks, methods

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def tokenizer():
    return builtin.build_tokenizer()


def test_pad_equal_to_eos_is_reported(tokenizer):
    assert checks.pad_is_eos(tokenizer) == []
    tokenizer.pad_token = tokenizer.eos_token
    try:
        [(severity, message)] = checks.pad_is_eos(tokenizer)
        assert severity == "warning" and "pad token equals EOS" in message
    finally:
        tokenizer.pad_token = "<pad>"


def test_double_bos_is_reported(tokenizer):
    from tokenizers import processors

    messages = builtin.chat_records(1)[0]["messages"]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert checks.double_bos(tokenizer, rendered) == []
    bos = tokenizer.bos_token_id
    tok = builtin.build_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)])
    [(severity, message)] = checks.double_bos(tok, rendered)
    assert "two BOS tokens" in message


def test_assistant_mask_without_generation_markers(tokenizer):
    messages = builtin.chat_records(1)[0]["messages"]
    assert checks.assistant_mask(tokenizer, messages) == []
    tok = builtin.build_tokenizer()
    tok.chat_template = builtin.CHAT_TEMPLATE.replace("{% generation %}", "").replace(
        "{% endgeneration %}", "")
    assert checks.assistant_mask(tok, messages) == []  # located by rendering, not markers
    empty = messages[:2]  # no assistant turn: nothing would be trained
    [(severity, message)] = checks.assistant_mask(tok, empty)
    assert severity == "error" and "assistant-token mask is empty" in message
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}LAST {% endif %}"
                         "{{ m['content'] }}\n{% endfor %}")
    [(severity, message)] = checks.assistant_mask(tok, messages)
    assert severity == "error" and "not prefix-preserving" in message


def test_truncation_rate():
    assert checks.truncation([10, 20, 30], 64, 0.2) == []
    [(severity, _)] = checks.truncation([10, 100, 30, 40, 50, 60, 20, 30, 40, 50], 64, 0.2)
    assert severity == "warning"
    [(severity, message)] = checks.truncation([100, 100, 30], 64, 0.2)
    assert severity == "error" and "67% of training sequences" in message


def test_target_modules_that_match_nothing(tokenizer):
    model = builtin.build_model(tokenizer)
    assert methods.resolve_targets(model, None, methods.ATTENTION) == list(methods.ATTENTION)
    assert methods.resolve_targets(model, ["all-linear"], ()) == "all-linear"
    with pytest.raises(methods.MethodError, match=r"\['query_key_value'\] match no module"):
        methods.resolve_targets(model, ["q_proj", "query_key_value"], methods.ATTENTION)


def test_embeddings_in_modules_to_save(tokenizer):
    model = builtin.build_model(tokenizer)
    assert checks.embeddings_saved(["score"], model) == []
    [(severity, message)] = checks.embeddings_saved(["embed_tokens", "lm_head"], model)
    assert severity == "warning" and "stores these in full" in message
