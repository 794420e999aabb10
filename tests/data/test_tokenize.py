"""Supervised encoding: prompt tokens masked with -100, every reply trained, LLaMA-Factory's truncation."""

from __future__ import annotations

import pytest

from finetune_kit.data.conversations import Conversations, Example
from finetune_kit.data.registry import DatasetRegistry
from finetune_kit.data.templates import get_template
from finetune_kit.data.tokenize import IGNORE_INDEX, encode_conversation, infer_seqlen, tokenize

MULTI = [
    {"role": "system", "content": "You are a shop assistant."},
    {"role": "user", "content": "Do you ship for free?"},
    {"role": "assistant", "content": "Yes, for orders over 99 yuan."},
    {"role": "user", "content": "When do you ship?"},
    {"role": "assistant", "content": "Within 48 hours of payment."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]
REPLIES = [m["content"] + "<|im_end|>\n" for m in MULTI if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def tok(bundled_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_dir)


@pytest.fixture(scope="module")
def chatml():
    return get_template("chatml")


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def trained_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Runs of consecutive trained positions, checking every trained label equals its input id."""
    spans: list[list[int]] = []
    previous = False
    for token, label in zip(ids, labels, strict=True):
        if label == IGNORE_INDEX:
            previous = False
            continue
        assert label == token
        if not previous:
            spans.append([])
        spans[-1].append(label)
        previous = True
    return spans


def test_one_turn_prompt_is_masked_and_reply_is_trained(tok, chatml):
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]
    ids, labels = encode_conversation(messages, tok, chatml, cutoff_len=1024)
    prompt = enc(tok, "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    reply = enc(tok, "Hello! How can I help?<|im_end|>\n")
    assert ids == prompt + reply
    assert labels == [IGNORE_INDEX] * len(prompt) + reply
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "Hello! How can I help?<|im_end|>\n"


def test_every_assistant_turn_is_trained(tok, chatml):
    ids, labels = encode_conversation(MULTI, tok, chatml, cutoff_len=1024)
    assert tok.decode(ids) == "".join(text for text, _ in chatml.segments(MULTI, tok))
    spans = trained_spans(ids, labels)
    assert [tok.decode(s) for s in spans] == REPLIES
    assert labels[0] == IGNORE_INDEX and labels[-1] == ids[-1]


def test_train_on_prompt_trains_everything(tok, chatml):
    ids, labels = encode_conversation(MULTI, tok, chatml, cutoff_len=1024, train_on_prompt=True)
    assert labels == ids


def test_mask_history_trains_only_the_last_reply(tok, chatml):
    ids, labels = encode_conversation(MULTI, tok, chatml, cutoff_len=1024, mask_history=True)
    full_ids, _ = encode_conversation(MULTI, tok, chatml, cutoff_len=1024)
    assert ids == full_ids
    assert [tok.decode(s) for s in trained_spans(ids, labels)] == [REPLIES[-1]]


def test_mask_history_keeps_the_last_reply_when_truncating(tok, chatml):
    last_pair = len(enc(tok, "<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n")) + len(
        enc(tok, REPLIES[-1])
    )
    ids, labels = encode_conversation(MULTI, tok, chatml, cutoff_len=last_pair + 3, mask_history=True)
    assert [tok.decode(s) for s in trained_spans(ids, labels)] == [REPLIES[-1]]
    assert tok.decode(ids).endswith("<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n" + REPLIES[-1])


@pytest.mark.parametrize(
    ("lengths", "expected"),
    [
        ((3000, 2000, 1000), (600, 400)),  # both long: proportional
        ((2000, 3000, 1000), (400, 600)),
        ((1000, 100, 1000), (900, 100)),  # short target: keep it, cut the source
        ((100, 1000, 1000), (100, 900)),  # short source: keep it, cut the target
        ((100, 500, 1000), (100, 500)),  # fits
        ((500, 100, 1000), (500, 100)),
        ((10, 10, 1000), (10, 10)),
        ((600, 600, 1000), (500, 500)),
    ],
)
def test_infer_seqlen_follows_llamafactory(lengths, expected):
    assert infer_seqlen(*lengths) == expected
    assert sum(infer_seqlen(*lengths)) <= lengths[2]


def test_cutoff_len_is_respected_and_truncation_counted(tok, chatml):
    conv = Conversations(
        tuple(
            Example(tuple(m), f"mem, row {i}")
            for i, m in enumerate(
                [
                    MULTI,
                    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                    [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "short"}],
                ]
            )
        )
    )
    full = tokenize(conv, tok, chatml, cutoff_len=4096)
    assert full.truncated == 0
    lengths = [len(x) for x in full.dataset["input_ids"]]
    cut = 24
    assert lengths[0] > cut and lengths[1] < cut and lengths[2] > cut
    small = tokenize(conv, tok, chatml, cutoff_len=cut)
    assert small.truncated == 2
    assert [len(x) for x in small.dataset["input_ids"]] == [cut, lengths[1], cut]
    # a long prompt with a short reply: the prompt is cut, the reply is kept whole
    row = small.dataset[2]
    assert tok.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == "short<|im_end|>\n"
    assert row["attention_mask"] == [1] * cut
    assert small.num_tokens == 2 * cut + lengths[1]
    assert small.num_trained_tokens == sum(sum(t != IGNORE_INDEX for t in x) for x in small.dataset["labels"])


def test_multi_turn_truncation_fills_turns_in_order(tok, chatml):
    ids, labels = encode_conversation(MULTI, tok, chatml, cutoff_len=1024)
    first_pair = [text for text, _ in chatml.segments(MULTI, tok)][:2]
    budget = len(enc(tok, first_pair[0])) + len(enc(tok, first_pair[1]))
    cut_ids, cut_labels = encode_conversation(MULTI, tok, chatml, cutoff_len=budget)
    assert cut_ids == ids[:budget]
    assert [tok.decode(s) for s in trained_spans(cut_ids, cut_labels)] == REPLIES[:1]


def test_conversations_tokenize_uses_the_models_template(tiny_llama):
    conv = DatasetRegistry.demo().load("shop_sharegpt").head(3)
    data = tokenize(conv, tiny_llama.tokenizer, tiny_llama.template, cutoff_len=2048)
    assert len(data) == 3 and data.truncated == 0 and data.cutoff_len == 2048
    for i, ex in enumerate(conv.examples):
        row = data.dataset[i]
        spans = trained_spans(row["input_ids"], row["labels"])
        replies = [m["content"] + "<|im_end|>\n" for m in ex.messages if m["role"] == "assistant"]
        assert [tiny_llama.tokenizer.decode(s) for s in spans] == replies
    shown = data.show(0, tiny_llama.tokenizer)
    assert shown.startswith("inputs:\n<|im_start|>") and "\nlabels:\n" in shown
    assert "TokenizedDataset(3 examples" in repr(data)
