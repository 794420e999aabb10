"""LoadedModel: batched greedy generation, streaming, stop handling and prompts, on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from finetune_kit.models import decoding
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.models.loaded import Completion

GREEDY = GenerationConfig(do_sample=False, max_new_tokens=12)
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "What is the capital of France? Please answer in one long sentence."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}],
]


@pytest.fixture(scope="module")
def greedy(tiny_llama) -> list[Completion]:
    return tiny_llama.generate(CONVERSATIONS, GREEDY, batch_size=1)


def test_batching_with_left_padding_does_not_change_greedy_output(tiny_llama, greedy):
    lengths = {len(tiny_llama.encode_prompt(c)) for c in CONVERSATIONS}
    assert len(lengths) == 3  # the batch really needs padding
    batched = tiny_llama.generate(CONVERSATIONS, GREEDY, batch_size=3)
    assert batched == greedy
    assert tiny_llama.generate(CONVERSATIONS, GREEDY, batch_size=2) == greedy


def test_completion_counts_and_length_finish(tiny_llama, greedy):
    for conv, done in zip(CONVERSATIONS, greedy, strict=False):
        assert done.prompt_tokens == len(tiny_llama.encode_prompt(conv))
        assert done.completion_tokens == GREEDY.max_new_tokens
        assert done.finish_reason == "length"
        assert done.text


def test_stream_pieces_join_to_the_final_completion(tiny_llama, greedy):
    *pieces, final = tiny_llama.stream(CONVERSATIONS[1], GREEDY)
    assert isinstance(final, Completion)
    assert all(isinstance(p, str) and p for p in pieces) and len(pieces) > 3
    assert "".join(pieces) == final.text
    assert final == greedy[1]


@pytest.fixture(scope="module")
def pieces(tiny_llama) -> list[str]:
    *texts, _ = tiny_llama.stream(CONVERSATIONS[1], GREEDY)
    return texts


def stop_case(pieces: list[str], stop: str, start: int) -> str:
    """Check ``stop`` first occurs at ``start`` of the full text; return the text before it.

    A broken precondition raises RuntimeError, not AssertionError, so it cannot pass as the expected xfail.
    """
    full = "".join(pieces)
    if full.find(stop) != start or start <= 0 or not stop.strip():
        raise RuntimeError(f"the tiny model's greedy text {full!r} does not suit stop string {stop!r}")
    return full[:start]


def test_stop_string_cuts_the_text(tiny_llama, pieces):
    k = len(pieces) // 2
    stop = pieces[k]  # a stop string that arrives as one streamed piece
    expected = stop_case(pieces, stop, len("".join(pieces[:k])))
    done = tiny_llama.generate([CONVERSATIONS[1]], GREEDY, stop=[stop])[0]
    assert done.text == expected
    assert done.finish_reason == "stop"
    *streamed, final = tiny_llama.stream(CONVERSATIONS[1], GREEDY, stop=[stop])
    assert "".join(streamed) == final.text == expected
    assert final.finish_reason == "stop"


def test_stream_holds_back_a_stop_string_split_across_pieces(tiny_llama, pieces):
    k = len(pieces) // 2
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    expected = stop_case(pieces, stop, len("".join(pieces[: k + 1])) - 2)
    assert tiny_llama.generate([CONVERSATIONS[1]], GREEDY, stop=[stop])[0].text == expected
    *streamed, final = tiny_llama.stream(CONVERSATIONS[1], GREEDY, stop=[stop])
    assert final.text == expected
    assert "".join(streamed) == expected


def test_stop_token_ids_include_im_end(tiny_llama):
    tok = tiny_llama.tokenizer
    ids = tiny_llama.stop_token_ids
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids
    assert tok.eos_token == "<|im_end|>" and ids[0] == tok.eos_token_id
    assert len(ids) == len(set(ids))


def test_finish_cuts_at_a_stop_token(tiny_llama):
    tok = tiny_llama.tokenizer
    words = tok.encode(" Paris is nice", add_special_tokens=False)
    row = [*words, tok.convert_tokens_to_ids("<|im_end|>"), *words]
    done = decoding.finish(tiny_llama, row, 5, GREEDY, ())
    assert done == Completion(
        text=" Paris is nice", prompt_tokens=5, completion_tokens=len(words), finish_reason="stop"
    )


def test_chat_puts_the_system_message_in_the_prompt(tiny_llama):
    ids = tiny_llama.encode_prompt("hi", system="You are a pirate.")
    assert tiny_llama.tokenizer.decode(ids) == (
        "<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tiny_llama.tokenizer.decode(tiny_llama.encode_prompt("hi")) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "hi"}]
    reply = tiny_llama.chat("hi", system="You are a pirate.", do_sample=False, max_new_tokens=6)
    assert reply == tiny_llama.generate([with_system], GREEDY.with_(max_new_tokens=6))[0].text
    # an explicit system message wins over the system argument
    assert tiny_llama.encode_prompt(with_system, system="ignored") == ids


def test_repr_is_one_line(tiny_llama):
    text = repr(tiny_llama)
    assert "\n" not in text
    device = "cpu" if not torch.cuda.is_available() else f"cuda:{torch.cuda.current_device()}"
    assert "template=chatml" in text and f"device={device}" in text and "dtype=float32" in text


@pytest.mark.slow
def test_bundled_model_knows_the_capital_of_france(bundled_model):
    reply = bundled_model.chat("What is the capital of France?", do_sample=False, max_new_tokens=24)
    assert "Paris" in reply
    assert bundled_model.template.name == "smollm2"
