"""Chat templates: exact LLaMA-Factory text, a Jinja twin that renders the same, and the tokenizer's own."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from finetune_kit.data.templates import TEMPLATES, get_template
from finetune_kit.errors import TemplateError

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

ONE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
SYSTEM = [{"role": "system", "content": "Be brief."}, *ONE]
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
QUESTION = [{"role": "user", "content": "Quote 'this' and \"that\" {{ not jinja }}\nnewline"}]
CONVERSATIONS = {
    "one": ONE,
    "system": SYSTEM,
    "multi": MULTI,
    "question": QUESTION,
    "question_system": [{"role": "system", "content": "S"}, *QUESTION],
    "multi_question": [*MULTI, {"role": "user", "content": "And 3+3?"}],
}


@pytest.fixture(scope="module")
def tok(bundled_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_dir)


@pytest.fixture()
def render(tok):
    """Render ``messages`` through ``tok.apply_chat_template`` with a given Jinja template."""
    native = tok.chat_template

    def run(jinja: str, messages, *, gen: bool) -> str:
        tok.chat_template = jinja
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    yield run
    tok.chat_template = native


def test_chatml_segments():
    t = get_template("chatml")
    assert t.segments(MULTI) == [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello!<|im_end|>\n", True),
        ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
        ("4<|im_end|>\n", True),
    ]
    assert t.segments(ONE) == [
        ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello!<|im_end|>\n", True),
    ]
    assert t.stop_words == ("<|im_end|>", "<|im_start|>")


def test_qwen_segments_add_the_default_system():
    t = get_template("qwen")
    assert t.segments(ONE) == [
        (
            f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
            False,
        ),
        ("Hello!<|im_end|>\n", True),
    ]
    assert t.segments(SYSTEM)[0][0] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_default_system_override():
    t = get_template("qwen", default_system="Custom.")
    assert t.segments(ONE)[0][0].startswith("<|im_start|>system\nCustom.<|im_end|>\n")
    assert get_template("chatml", default_system="X").segments(ONE)[0][0].startswith("<|im_start|>system\nX<|im_end|>")
    assert TEMPLATES["qwen"].default_system == QWEN_SYSTEM  # the registry is not mutated


def test_empty_system_message_falls_back_to_the_default_like_llamafactory():
    t = get_template("qwen")
    assert t.segments([{"role": "system", "content": ""}, *ONE]) == t.segments(ONE)


def test_llama3_segments_with_bos_and_header_ids():
    t = get_template("llama3")
    fake_tok = SimpleNamespace(bos_token="<|begin_of_text|>")
    assert t.segments(MULTI, fake_tok) == [
        (
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            False,
        ),
        ("Hello!<|eot_id|>", True),
        (
            "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            False,
        ),
        ("4<|eot_id|>", True),
    ]
    assert t.stop_words == ("<|eot_id|>", "<|eom_id|>")


def test_prompt_is_the_text_before_the_reply():
    t = get_template("chatml")
    assert t.prompt(MULTI[:-1]) == "".join(text for text, _ in t.segments(MULTI[:-1]))
    assert t.prompt(MULTI[:-1]).endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(TemplateError, match="must end with a user message"):
        t.prompt(ONE)
    with pytest.raises(TemplateError):
        t.prompt([])


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
def test_jinja_renders_exactly_the_segments(tok, render, name, conv):
    t = get_template(name)
    messages = CONVERSATIONS[conv]
    rendered = render(t.jinja(), messages, gen=messages[-1]["role"] == "user")
    assert rendered == "".join(text for text, _ in t.segments(messages, tok))


@pytest.mark.parametrize("name", ["chatml", "qwen", "llama3"])
def test_jinja_user_turns_carry_the_reply_header_as_llamafactory_writes_them(tok, render, name):
    t = get_template(name)
    question = MULTI[:-1]
    assert render(t.jinja(), question, gen=True) == render(t.jinja(), question, gen=False) == t.prompt(question, tok)
    assert render(t.jinja(), MULTI, gen=False) == "".join(text for text, _ in t.segments(MULTI, tok))


def test_jinja_of_qwen3_without_thinking_ends_the_prompt_with_an_empty_thought(tok, render):
    t = get_template("qwen3").with_options(enable_thinking=False)
    rendered = render(t.jinja(), QUESTION, gen=True)
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert rendered == t.prompt(QUESTION, tok)


def test_jinja_keeps_an_overridden_default_system_with_quotes(tok, render):
    t = get_template("chatml", default_system='It\'s "quoted"\nand multi-line')
    rendered = render(t.jinja(), QUESTION, gen=True)
    assert rendered.startswith('<|im_start|>system\nIt\'s "quoted"\nand multi-line<|im_end|>\n')
    assert rendered == t.prompt(QUESTION, tok)


@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
def test_native_template_segments_match_apply_chat_template(tok, conv):
    messages = CONVERSATIONS[conv]
    t = get_template(None, tok)
    assert t.is_native and t.jinja() == tok.chat_template
    segments = t.segments(messages, tok)
    gen = messages[-1]["role"] == "user"
    assert "".join(text for text, _ in segments) == tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=gen
    )
    replies = [m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"]
    assert [text for text, trained in segments if trained] == replies


def test_native_template_uses_the_tokenizers_default_system(tok):
    segments = get_template(None, tok).segments(ONE, tok)
    assert segments[0] == (
        f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        False,
    )
    custom = get_template(None, tok, default_system="Custom.").segments(ONE, tok)
    assert custom[0][0].startswith("<|im_start|>system\nCustom.<|im_end|>\n")


def test_native_template_that_rewrites_earlier_turns_is_refused(tok):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tok.name_or_path)
    other.chat_template = "{{ messages[-1]['content'] }}"
    t = get_template(None, other)
    with pytest.raises(TemplateError, match="incrementally"):
        t.segments(ONE, other)


def test_no_template_anywhere_is_an_error(tok):
    bare = SimpleNamespace(chat_template=None)
    with pytest.raises(TemplateError) as err:
        get_template(None, bare)
    assert "template='chatml'" in str(err.value)
    assert "llama3" in str(err.value)


def test_unknown_template_lists_the_available_ones():
    with pytest.raises(TemplateError) as err:
        get_template("chatm")
    message = str(err.value)
    assert "Did you mean 'chatml'?" in message
    assert f"Available: {', '.join(sorted(TEMPLATES))}" in message


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "assistant", "content": "first"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "assistant", "content": "c"},
        ],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}],
        [{"role": "system", "content": "s"}, {"role": "system", "content": "again"}, {"role": "user", "content": "a"}],
        [{"role": "user", "content": "a"}, {"content": "no role"}],
    ],
)
def test_roles_must_alternate(messages):
    with pytest.raises(TemplateError, match="alternate user, assistant"):
        get_template("chatml").segments(messages)


def test_bad_role_message_counts_turns_after_the_system_message():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(TemplateError) as err:
        get_template("chatml").segments(messages)
    assert str(err.value) == (
        "message 1 has role 'user' but 'assistant' was expected: after an optional system "
        "message, turns must alternate user, assistant, user, ..."
    )


def test_stop_token_ids_keep_only_real_single_tokens(tok):
    im_end, im_start = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|im_start|>")
    ids = get_template("chatml").stop_token_ids(tok)
    assert ids[0] == tok.eos_token_id
    assert set(ids) == {tok.eos_token_id, im_end, im_start}
    assert len(ids) == len(set(ids))
    assert get_template("llama3").stop_token_ids(tok) == [tok.eos_token_id]  # no <|eot_id|> in this vocab


def test_a_template_of_another_family_is_warned_about_not_refused(tok):
    # the bundled tokenizer's own chat template is ChatML
    assert get_template("chatml").check_against(tok) is None
    assert get_template("qwen").check_against(tok) is None
    warning = get_template("llama3").check_against(tok)
    assert warning is not None and "<|start_header_id|>user<|end_header_id|>" in warning
    assert "template: null" in warning
    assert get_template("alpaca").check_against(tok) is not None


def test_loading_with_a_mismatched_template_warns(tokenizer_dir):
    from finetune_kit import ModelSource
    from finetune_kit.errors import FinetuneKitWarning
    from finetune_kit.models.loader import load_tokenizer

    source = ModelSource.local(tokenizer_dir).with_config(template="vicuna")
    with pytest.warns(FinetuneKitWarning, match="USER:"):
        tokenizer, template = load_tokenizer(source, tokenizer_dir, source.plan())
    assert template.name == "vicuna"
