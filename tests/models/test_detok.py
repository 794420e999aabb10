"""Incremental detokenization (models/detok.py) with the bundled model's real tokenizer: pieces pushed
token by token join to what ``tokenizer.decode`` gives, and no stop string (or what follows it) leaks."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from finetune_kit.models.detok import IncrementalText, cut_at_stop, stop_prefix_len

TEXTS = [
    "Hello, world! How are you today?",
    "你好，世界！我们包邮吗？请在三天内发货。",
    "Emoji: 😀👍🏽 👨‍👩‍👧 🇫🇷 and 🤖🤖🤖 done",
    "  leading spaces\n\n\tand tabs  \n",
    "trailing spaces   ",
    "it 's don 't , . ? ! ; :",
    "naïve café über Ünïcödé — “quotes” … ½",
    "日本語のテキストです。한국어 텍스트도 있습니다.",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(3))",
    "mixed 中文 and English 😀 with\nnewlines\r\nand CRLF",
    "x <|im_end|> y <|im_start|>assistant\nz",
    " ",
    "\n\n\n",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "1234567890 3.14159 -42 1e10",
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def push_all(text: IncrementalText, ids: list[int]) -> list[str]:
    return [text.push(t) for t in ids]


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("sample", TEXTS)
def test_pieces_join_to_the_decoded_text(tok, sample, skip):
    ids = tok.encode(sample, add_special_tokens=False)
    text = IncrementalText(tok, skip_special_tokens=skip)
    pieces = push_all(text, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in p for p in pieces)  # half a character is never shown
    assert text.sent == "".join(pieces) and not text.stopped


def test_a_multibyte_character_split_over_tokens_waits_for_its_last_byte(tok):
    ids = tok.encode("🤖", add_special_tokens=False)
    assert len(ids) > 1  # byte-level BPE splits it
    text = IncrementalText(tok)
    assert push_all(text, ids) == [""] * (len(ids) - 1) + ["🤖"]


def test_random_token_sequences_join_to_the_decoded_text(tok):
    rng = random.Random(0)
    alphabet = list("abcxyz ABC 0129 \n\t.,!?'\"-") + list("你好世界包邮") + ["😀", "🇫🇷", "é", "ß", "—", "👍🏽"]
    for _ in range(150):
        sample = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        ids = tok.encode(sample, add_special_tokens=False)
        pieces = push_all(IncrementalText(tok), ids)
        assert "".join(pieces) == tok.decode(ids), sample


# ----- stop strings --------------------------------------------------------------------------------------------
STOP_CASES = [
    ("Hello world.\n\nSecond paragraph", ["\n\n"]),
    ("The answer is 42. Observation: done", ["Observation:"]),
    ("你好，世界！我们包邮吗？", ["世界"]),
    ("Emoji 😀 then 👍 end", ["👍"]),
    ("Hello world", ["ell"]),  # inside one token
    ("abc END def", ["def", "END"]),  # the first one in the text wins, not the first listed
    ("abcabcabd", ["abd"]),
    ("aaab", ["aab"]),
    ("Hello", ["Hello"]),  # nothing before it
    ("x 😀😀 y", ["😀😀"]),
    ("repeat stop stop", [" stop", "stop"]),
    ("User: hi\nAssistant: hello\nUser: bye", ["\nUser:"]),
    ("line one\nline two", ["\n"]),
]


@pytest.mark.parametrize(("sample", "stop"), STOP_CASES)
def test_a_stop_string_and_all_after_it_is_never_returned(tok, sample, stop):
    ids = tok.encode(sample, add_special_tokens=False)
    full = tok.decode(ids)
    cut = cut_at_stop(full, stop)
    assert cut is not None  # the case must contain a stop string
    text = IncrementalText(tok, stop=stop)
    pieces = []
    for i, token in enumerate(ids):
        pieces.append(text.push(token))
        if text.stopped:
            assert all(text.push(t) == "" for t in ids[i + 1 :])  # nothing once stopped
            break
    assert text.stopped
    joined = "".join(pieces)
    assert joined == full[:cut] == text.sent
    assert not any(s in joined for s in stop)


def test_random_texts_with_random_stop_strings(tok):
    rng = random.Random(1)
    alphabet = list("ab cd\n.") + ["你", "好", "😀", "é"]
    checked = 0
    for _ in range(200):
        sample = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 30)))
        ids = tok.encode(sample, add_special_tokens=False)
        full = tok.decode(ids)
        start = rng.randrange(len(full))
        stop = [full[start : start + rng.randint(1, 4)], "zz"]
        cut = cut_at_stop(full, stop)
        text = IncrementalText(tok, stop=stop)
        joined = "".join(push_all(text, ids))
        if cut is not None:
            assert text.stopped and joined == full[:cut], (sample, stop)
            checked += 1
        else:
            assert joined == full[: len(full) - stop_prefix_len(full, stop)]
    assert checked > 150


def test_a_tail_that_may_begin_a_stop_string_is_held_back(tok):
    ids = tok.encode("text ending EN", add_special_tokens=False)
    text = IncrementalText(tok, stop=["END"])
    assert "".join(push_all(text, ids)) == "text ending "  # "EN" could become "END"
    assert not text.stopped and text.sent == "text ending "
    more = tok.encode("ough", add_special_tokens=False)
    assert "".join(push_all(text, more)) == "ENough"  # it was not a stop string after all
    assert not text.stopped


def test_a_stop_string_split_over_many_tokens(tok):
    sample = "First answer.<|stop here|>Second answer."
    ids = tok.encode(sample, add_special_tokens=False)
    assert len(tok.encode("<|stop here|>", add_special_tokens=False)) > 3
    text = IncrementalText(tok, stop=["<|stop here|>"])
    pieces = push_all(text, ids)
    assert "".join(pieces) == "First answer." and text.stopped
    assert not any("<" in p for p in pieces)
