"""Raw-text completions and embeddings: ``/v1/completions``, ``/v1/embeddings``, ``/api/embed``, ``/api/embeddings``.

A real Server on 127.0.0.1 over the tiny Llama, driven by the official ``openai`` and ``ollama``
clients and raw httpx. Completions must equal ``model.generate`` on the prompt's own token ids
(no chat template); embeddings must equal the mean of the last hidden state, whatever the batch.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from collections.abc import Sequence

import httpx
import numpy as np
import ollama
import openai
import pytest
import torch

from finetune_kit.models.embedding import embed_ids
from finetune_kit.models.engine import Completion, EmbeddingEngine, Engine, TextCompletionEngine
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.serve import ServeConfig, Server

LOCAL = dict(api_host="127.0.0.1", api_port=0, api_key=None, api_model_name=None)
PROMPT = "The parcel left the warehouse on"
TEXTS = ["where is my parcel?", "has my order shipped yet, and when will it arrive at my door?", "hi"]


def hf_greedy(lm, text: str, max_new_tokens: int) -> tuple[str, int]:
    """``model.generate`` on the raw text's ids, cut at the first stop token: (text, new tokens)."""
    ids = lm.tokenizer(text)["input_ids"]
    x = torch.tensor([ids])
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.stop_token_ids[0]
    with torch.inference_mode():
        out = lm.model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=lm.stop_token_ids,
            pad_token_id=pad,
        )
    new = out[0, len(ids) :].tolist()
    stops = [i for i, t in enumerate(new) if t in lm.stop_token_ids]
    new = new[: stops[0]] if stops else new
    return lm.tokenizer.decode(new, skip_special_tokens=True), len(new)


def mean_hidden(model, lm, text: str) -> np.ndarray:
    """The reference embedding: mean of ``hidden_states[-1]`` of the whole model, one text, L2-normalized."""
    x = torch.tensor([lm.encode_text(text)])
    with torch.inference_mode():
        hidden = model(input_ids=x, output_hidden_states=True).hidden_states[-1][0].float()
    v = hidden.mean(dim=0).numpy()
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def handle(tiny_llama):
    with Server(tiny_llama, ServeConfig(**LOCAL), GenerationConfig(max_new_tokens=16)).start() as running:
        yield running


@pytest.fixture()
def client(handle):
    return openai.OpenAI(api_key="0", base_url=handle.base_url, max_retries=0)


# ----- the model side -----------------------------------------------------------------------------------------
def test_loaded_model_has_both_capabilities(tiny_llama):
    assert isinstance(tiny_llama, TextCompletionEngine) and isinstance(tiny_llama, EmbeddingEngine)
    assert tiny_llama.embedding_size == 64


def test_complete_continues_the_raw_ids_as_generate_does(tiny_llama):
    expected, count = hf_greedy(tiny_llama, PROMPT, 12)
    done = tiny_llama.complete(PROMPT, max_new_tokens=12)
    assert [(c.text, c.completion_tokens) for c in done] == [(expected, count)]
    assert done[0].prompt_tokens == len(tiny_llama.tokenizer(PROMPT)["input_ids"])
    assert done[0].prompt_tokens != len(tiny_llama.encode_prompt(PROMPT))  # no chat template around it
    *pieces, final = tiny_llama.stream_text(PROMPT, max_new_tokens=12)
    assert "".join(pieces) == expected and final == done[0]
    with pytest.raises(ValueError, match="has no tokens"):
        tiny_llama.complete(["fine", ""])


def test_embeddings_are_normalized_mean_hidden_states_whatever_the_batch(tiny_llama):
    batched = np.array(tiny_llama.embed(TEXTS, batch_size=3))
    single = np.array([tiny_llama.embed(t)[0] for t in TEXTS])
    reference = np.array([mean_hidden(tiny_llama.model, tiny_llama, t) for t in TEXTS])
    assert batched.shape == (3, 64)
    np.testing.assert_allclose(batched, single, atol=1e-5)
    np.testing.assert_allclose(batched, reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    raw = np.array(tiny_llama.embed(TEXTS[0], normalize=False)[0])
    np.testing.assert_allclose(raw / np.linalg.norm(raw), batched[0], atol=1e-5)
    first3 = embed_ids(tiny_llama, [tiny_llama.encode_text(TEXTS[1])[:3]], batch_size=1, normalize=True)
    np.testing.assert_allclose(tiny_llama.embed(TEXTS[1], max_tokens=3), first3, atol=1e-6)


def test_embeddings_go_through_an_active_adapter(tiny_llama):
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(tiny_llama.model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    tuned = dataclasses.replace(tiny_llama, model=peft_model)
    got = np.array(tuned.embed(TEXTS))
    np.testing.assert_allclose(got, [mean_hidden(peft_model, tiny_llama, t) for t in TEXTS], atol=1e-5)
    assert not np.allclose(got, tiny_llama.embed(TEXTS), atol=1e-3)  # the adapter changed them


# ----- /v1/completions ----------------------------------------------------------------------------------------
def test_completion_equals_generate_on_the_raw_prompt(client, tiny_llama):
    expected, count = hf_greedy(tiny_llama, PROMPT, 16)
    # max_tokens defaults to 16; seed, user and the penalties are accepted and ignored
    resp = client.completions.create(model="x", prompt=PROMPT, temperature=0, seed=7, user="me", presence_penalty=0.5)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert [(c.index, c.text, c.logprobs) for c in resp.choices] == [(0, expected, None)]
    assert resp.choices[0].finish_reason == ("length" if count == 16 else "stop")
    n_prompt = len(tiny_llama.encode_text(PROMPT))
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (n_prompt, count)
    assert resp.usage.total_tokens == n_prompt + count


def test_list_prompt_with_n_and_echo(client, tiny_llama):
    prompts = [PROMPT, "Refunds are"]
    singles = [hf_greedy(tiny_llama, p, 5) for p in prompts]
    resp = client.completions.create(model="x", prompt=prompts, n=2, max_tokens=5, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert [c.text for c in resp.choices] == [singles[0][0]] * 2 + [singles[1][0]] * 2
    assert resp.usage.prompt_tokens == sum(len(tiny_llama.encode_text(p)) for p in prompts)  # once per prompt
    assert resp.usage.completion_tokens == 2 * (singles[0][1] + singles[1][1])
    echoed = client.completions.create(model="x", prompt=prompts, max_tokens=5, temperature=0, echo=True)
    assert [c.text for c in echoed.choices] == [p + s for p, (s, _) in zip(prompts, singles, strict=True)]


def test_stop_strings_cut_the_text(client, tiny_llama):
    full, _ = hf_greedy(tiny_llama, PROMPT, 16)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3 and full.find(stop) > 0
    resp = client.completions.create(model="x", prompt=PROMPT, max_tokens=16, temperature=0, stop=stop)
    assert resp.choices[0].text == full[: full.find(stop)] and resp.choices[0].finish_reason == "stop"


def test_streaming_equals_non_streaming(client):
    kwargs = dict(model="x", prompt=PROMPT, max_tokens=10, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    *texts, last = chunks
    assert "".join(c.choices[0].text for c in texts) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in texts[:-1]] == [None] * (len(texts) - 1)
    assert texts[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.choices == [] and last.usage == whole.usage
    # several choices stream one after another, each told apart by its index; echo sends the prompt first
    both = {**kwargs, "prompt": [PROMPT, "Refunds are"], "echo": True}
    many = list(client.completions.create(**both, stream=True))
    joined = ["".join(c.choices[0].text for c in many if c.choices[0].index == i) for i in (0, 1)]
    plain = client.completions.create(**both)
    assert joined == [c.text for c in plain.choices]


def test_raw_sse_wire_format(handle):
    body = {"model": "x", "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{handle.base_url}/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e and not e.startswith(":")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(set(c) == {"id", "object", "created", "model", "choices"} for c in chunks)  # no usage unasked
    assert all(set(c["choices"][0]) == {"text", "index", "logprobs", "finish_reason"} for c in chunks)
    assert chunks[-1]["choices"][0]["text"] == "" and chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"suffix": " the end."}, "suffix", "suffix (insert mode) is not supported"),
        ({"logprobs": 2}, "logprobs", "logprobs are not supported"),
        ({"best_of": 3}, "best_of", "best_of=3 is not supported"),
        ({"logit_bias": {"50256": -100}}, "logit_bias", "vocabulary has 49152 tokens"),
        ({"prompt": [1, 2, 3]}, "prompt", "token-id prompts are not accepted"),
        ({"prompt": []}, "prompt", "non-empty list of strings"),
        ({"prompt": ""}, "prompt", "has no tokens"),  # SmolLM2's tokenizer adds no BOS
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4 strings"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_the_field(client, extra, param, words):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**{"model": "x", "prompt": PROMPT, **extra})
    assert err.value.param == param and words in err.value.message


def test_context_length_counts_the_prompt_and_max_tokens(client, tiny_llama):
    long = "word " * 500
    n = len(tiny_llama.encode_text(long))
    assert 496 < n <= 512 - 1  # fits the 512-token context alone, not with 16 new tokens
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="x", prompt=long)
    assert err.value.code == "context_length_exceeded" and f"{n + 16} tokens ({n} in prompt" in err.value.message
    assert client.completions.create(model="x", prompt=long, max_tokens=512 - n).usage.prompt_tokens == n


def test_llamafactory_tutorial_calls(handle):
    """The tutorial's OpenAI-client section, with only base_url and the model names changed."""
    client = openai.OpenAI(base_url=handle.base_url, api_key="ollama")
    completion = client.completions.create(model="tiny-llama", prompt="Say this is a test")
    assert isinstance(completion.choices[0].text, str) and completion.usage.completion_tokens <= 16
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    assert client.models.retrieve("tiny-llama").id == "tiny-llama"
    embeddings = client.embeddings.create(model="tiny-llama", input=["why is the sky blue?", "why is the grass green?"])
    assert [len(e.embedding) for e in embeddings.data] == [64, 64]


# ----- /v1/embeddings -----------------------------------------------------------------------------------------
def test_embeddings_float_and_base64_agree_with_the_model(client, tiny_llama, handle):
    expected = tiny_llama.embed(TEXTS)
    floats = client.embeddings.create(model="x", input=TEXTS, encoding_format="float")
    assert floats.object == "list" and floats.model == "tiny-llama"
    assert [(d.object, d.index) for d in floats.data] == [("embedding", i) for i in range(3)]
    np.testing.assert_allclose([d.embedding for d in floats.data], expected, atol=1e-6)
    assert all(math.isclose(np.linalg.norm(d.embedding), 1.0, abs_tol=1e-5) for d in floats.data)
    n_tokens = sum(len(tiny_llama.encode_text(t)) for t in TEXTS)
    assert (floats.usage.prompt_tokens, floats.usage.total_tokens) == (n_tokens, n_tokens)
    # the client asks for base64 by default and decodes it to floats: the same vectors, bit for bit
    default = client.embeddings.create(model="x", input=TEXTS)
    assert [d.embedding for d in default.data] == [d.embedding for d in floats.data]
    raw = httpx.post(f"{handle.base_url}/embeddings", json={"input": TEXTS[0], "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert (
        vector.tolist()
        == client.embeddings.create(model="x", input=TEXTS[0], encoding_format="float").data[0].embedding
    )
    same = client.embeddings.create(model="x", input=[TEXTS[0], TEXTS[0]], encoding_format="float")
    np.testing.assert_allclose(same.data[0].embedding, same.data[1].embedding, atol=1e-6)  # batch rows: not bit for bit


@pytest.mark.parametrize(
    ("extra", "param", "words", "code"),
    [
        ({"dimensions": 32}, "dimensions", "embeddings have 64 dimensions and cannot be shortened", None),
        ({"input": [[1, 2, 3]]}, "input", "token-id inputs are not accepted", None),
        ({"input": []}, "input", "non-empty list of strings", None),
        ({"input": ["hi", ""]}, "input", "input[1] has no tokens", None),
        ({"input": "word " * 600}, "input", "maximum context length is 512 tokens", "context_length_exceeded"),
        ({"encoding_format": "int8"}, "encoding_format", "'float' or 'base64'", None),
    ],
)
def test_embedding_requests_that_cannot_be_honoured(client, extra, param, words, code):
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(**{"model": "x", "input": "hello", **extra})
    assert err.value.param == param and words in err.value.message and err.value.code == code


def test_dimensions_equal_to_the_model_s_own_are_accepted(client):
    assert len(client.embeddings.create(model="x", input="hello", dimensions=64).data[0].embedding) == 64


# ----- Ollama: /api/embed and /api/embeddings ---------------------------------------------------------------
def test_ollama_embed_equals_the_openai_route(handle, tiny_llama):
    client = ollama.Client(host=handle.url)
    one = client.embed(model="tiny-llama", input=TEXTS[0])
    many = client.embed(model="tiny-llama:latest", input=TEXTS)
    np.testing.assert_allclose(many.embeddings, tiny_llama.embed(TEXTS), atol=1e-6)
    np.testing.assert_allclose(one.embeddings[0], many.embeddings[0], atol=1e-6)
    assert one.model == "tiny-llama" and many.model == "tiny-llama:latest"
    assert many.prompt_eval_count == sum(len(tiny_llama.encode_text(t)) for t in TEXTS)
    assert many.total_duration >= many.load_duration >= 0
    assert client.embed(model="tiny-llama", input=[]).embeddings == []


def test_ollama_embed_truncates_unless_told_not_to(handle, tiny_llama):
    client = ollama.Client(host=handle.url)
    long = "word " * 600
    cut = client.embed(model="tiny-llama", input=long)
    assert cut.prompt_eval_count == 512
    np.testing.assert_allclose(cut.embeddings[0], tiny_llama.embed(long, max_tokens=512)[0], atol=1e-6)
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="tiny-llama", input=long, truncate=False)
    assert err.value.status_code == 400 and err.value.error.startswith("input length exceeds the context length")


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": "tiny-llama", "input": "hi", "dimensions": 8}, 400, "cannot be shortened to 8"),
        ({"model": "nope", "input": "hi"}, 404, "model 'nope' not found"),
        ({"input": "hi"}, 400, "model is required"),
        ({"model": "tiny-llama", "input": [1, 2]}, 400, "input"),
    ],
)
def test_ollama_embed_errors(handle, body, status, words):
    resp = httpx.post(f"{handle.url}/api/embed", json=body, timeout=60)
    assert resp.status_code == status and words in resp.json()["error"] and set(resp.json()) == {"error"}


def test_ollama_legacy_embeddings_are_unnormalized(handle, tiny_llama):
    client = ollama.Client(host=handle.url)
    vector = np.array(client.embeddings(model="tiny-llama", prompt=TEXTS[0]).embedding)
    np.testing.assert_allclose(vector, tiny_llama.embed(TEXTS[0], normalize=False)[0], atol=1e-6)
    np.testing.assert_allclose(vector / np.linalg.norm(vector), tiny_llama.embed(TEXTS[0])[0], atol=1e-6)
    assert list(client.embeddings(model="tiny-llama", prompt="").embedding) == []
    assert httpx.get(f"{handle.url}/api/embed").status_code == 405


# ----- an engine without the capabilities -------------------------------------------------------------------
class ChatOnlyEngine:
    """The bare :class:`Engine` protocol: it chats, but cannot continue raw text or embed."""

    name, context_length, max_concurrency = "chat-only", 100, 1

    def encode_prompt(self, messages, system=None) -> list[int]:
        return [1, 2, 3]

    def render_prompt(self, messages) -> str:
        return "prompt"

    def generate(self, conversations, generation=None, *, batch_size=8, stop: Sequence[str] = ()) -> list[Completion]:
        return [Completion("ok", 3, 1, "stop") for _ in conversations]

    def stream(self, messages, generation=None, *, system=None, stop: Sequence[str] = ()):
        yield Completion("ok", 3, 1, "stop")


def test_an_engine_without_them_answers_400():
    engine = ChatOnlyEngine()
    assert isinstance(engine, Engine) and not isinstance(engine, (TextCompletionEngine, EmbeddingEngine))
    with Server(engine, ServeConfig(**LOCAL)).start() as running:
        client = openai.OpenAI(api_key="0", base_url=running.base_url, max_retries=0)
        with pytest.raises(openai.BadRequestError, match=r"ChatOnlyEngine\) cannot continue raw text"):
            client.completions.create(model="x", prompt="hi")
        with pytest.raises(openai.BadRequestError, match=r"ChatOnlyEngine\) cannot embed text"):
            client.embeddings.create(model="x", input="hi")
        resp = httpx.post(f"{running.url}/api/embed", json={"model": "chat-only", "input": "hi"})
        assert resp.status_code == 400 and "cannot embed text" in resp.json()["error"]
