"""The server's limits, OpenAI's sampling extras and named LoRA adapters, over the real bundled model.

A real Server on 127.0.0.1 driven by the official ``openai`` and ``ollama`` clients and raw httpx:
bodies above ``max_request_bytes`` get a 413 whether they declare their length or arrive in
chunks; ``max_tokens_limit`` refuses a larger ask and caps an open one; seed, penalties,
logit_bias and response_format do what OpenAI documents; and a server with named adapters gives
each ``model`` the answer of its own adapter, alone or mixed in one batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from finetune_kit.models.generation import GenerationConfig
from finetune_kit.serve import ServeConfig, Server

LOCAL = dict(api_host="127.0.0.1", api_port=0, api_key=None, api_model_name=None)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LONG = [{"role": "user", "content": "Write a very long essay about the history of the Roman Empire."}]
BYTES = 2048
LIMIT = 8
JSON = {"content-type": "application/json"}


def greedy(model, messages, max_new_tokens: int):
    return model.generate([messages], GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens))[0]


# ----- max_request_bytes and max_tokens_limit ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def limited(bundled_model):
    config = ServeConfig(**LOCAL, max_request_bytes=BYTES, max_tokens_limit=LIMIT)
    with Server(bundled_model, config, GenerationConfig(do_sample=False, max_new_tokens=LIMIT)).start() as running:
        yield running


def chunks(body: dict) -> Iterator[bytes]:
    """``body`` as JSON sent in 256-byte pieces: httpx uploads it chunked, with no Content-Length."""
    raw = json.dumps(body).encode()
    for start in range(0, len(raw), 256):
        yield raw[start : start + 256]


@pytest.mark.slow
@pytest.mark.parametrize("upload", ["content-length", "chunked"])
def test_a_body_above_max_request_bytes_is_413_in_each_apis_shape(limited, upload):
    big = [{"role": "user", "content": "x" * (BYTES + 100)}]
    for path, body in [
        ("/v1/chat/completions", {"model": "m", "messages": big}),
        ("/v1/completions", {"model": "m", "prompt": "x" * (BYTES + 100)}),
        ("/api/chat", {"model": limited.model_name, "messages": big}),
        ("/api/generate", {"model": limited.model_name, "prompt": "x" * (BYTES + 100)}),
    ]:
        if upload == "chunked":
            resp = httpx.post(f"{limited.url}{path}", content=chunks(body), headers=JSON, timeout=60)
            assert "content-length" not in resp.request.headers and resp.request.headers["transfer-encoding"]
        else:
            resp = httpx.post(f"{limited.url}{path}", json=body, timeout=60)
            assert int(resp.request.headers["content-length"]) > BYTES
        assert resp.status_code == 413, (path, resp.text)
        if path.startswith("/api/"):
            assert list(resp.json()) == ["error"] and f"limit of {BYTES} bytes" in resp.json()["error"]
        else:
            error = resp.json()["error"]
            assert (error["type"], error["code"], error["param"]) == (
                "invalid_request_error",
                "request_too_large",
                None,
            )
            assert f"limit of {BYTES} bytes" in error["message"]
    # a small body sent in chunks is read whole and served
    small = {"model": "m", "messages": QUESTION, "max_tokens": 2, "temperature": 0}
    resp = httpx.post(f"{limited.base_url}/chat/completions", content=chunks(small), headers=JSON, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] <= 2


@pytest.mark.slow
def test_the_openai_client_sees_413_as_an_api_status_error(limited):
    client = openai.OpenAI(api_key="0", base_url=limited.base_url, max_retries=0)
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * BYTES}])
    assert err.value.status_code == 413 and err.value.body["code"] == "request_too_large"


@pytest.mark.slow
def test_max_tokens_above_the_limit_is_400_naming_the_field(limited):
    client = openai.OpenAI(api_key="0", base_url=limited.base_url, max_retries=0)
    for call in (
        lambda: client.chat.completions.create(model="m", messages=QUESTION, max_tokens=LIMIT + 1),
        lambda: client.chat.completions.create(model="m", messages=QUESTION, max_tokens=LIMIT + 1, stream=True),
        lambda: client.completions.create(model="m", prompt="Paris is", max_tokens=LIMIT + 1),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            call()
        assert (err.value.body["param"], err.value.body["code"]) == ("max_tokens", "max_tokens_exceeded")
        assert f"limit of {LIMIT} tokens" in err.value.body["message"]
    at_limit = client.chat.completions.create(model="m", messages=LONG, max_tokens=LIMIT, temperature=0)
    assert (at_limit.usage.completion_tokens, at_limit.choices[0].finish_reason) == (LIMIT, "length")


@pytest.mark.slow
def test_num_predict_above_the_limit_is_400_and_an_open_one_is_capped(limited):
    client = ollama.Client(host=limited.url)
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model=limited.model_name, messages=QUESTION, options={"num_predict": LIMIT + 1})
    assert err.value.status_code == 400 and f"limit of {LIMIT} tokens" in err.value.error
    for unlimited in (-1, -2):
        answer = client.chat(
            model=limited.model_name, messages=LONG, options={"num_predict": unlimited, "temperature": 0}, stream=False
        )
        assert answer.eval_count <= LIMIT and answer.done_reason == "length"
    made = client.generate(model=limited.model_name, prompt=LONG[0]["content"], options={"num_predict": -1})
    assert made.eval_count <= LIMIT


@pytest.fixture(scope="module")
def default_length(bundled_model):
    """A server whose default reply length (1024 tokens, the Server's default) is above its max_tokens_limit."""
    with Server(bundled_model, ServeConfig(**LOCAL, max_tokens_limit=LIMIT)).start() as running:
        yield running


@pytest.mark.slow
@pytest.mark.parametrize("route", ["ollama_chat", "openai_chat", "openai_completion"])
def test_a_request_that_leaves_max_tokens_out_is_capped_not_refused(default_length, route):
    """Leaving max_tokens out means "the server's default"; with max_tokens_limit that default must be capped at
    the limit (as Ollama's routes do), not refused with a 400 about a max_tokens the client never sent."""
    client = openai.OpenAI(api_key="0", base_url=default_length.base_url, max_retries=0)
    if route == "ollama_chat":
        options = {"temperature": 0}
        answer = ollama.Client(host=default_length.url).chat(
            model=default_length.model_name, messages=LONG, options=options, stream=False
        )
        assert answer.eval_count <= LIMIT
    elif route == "openai_chat":
        chat = client.chat.completions.create(model="m", messages=LONG, temperature=0)
        assert chat.usage.completion_tokens <= LIMIT
    else:  # OpenAI's default max_tokens for /v1/completions is 16
        text = client.completions.create(model="m", prompt="The Roman Empire", temperature=0)
        assert text.usage.completion_tokens <= LIMIT


# ----- OpenAI's sampling extras ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def handle(bundled_model):
    with Server(bundled_model, ServeConfig(**LOCAL), GenerationConfig(do_sample=False, max_new_tokens=16)).start() as h:
        yield h


@pytest.fixture()
def client(handle):
    return openai.OpenAI(api_key="0", base_url=handle.base_url, max_retries=0, timeout=120)


def reply(client, messages, **kwargs) -> tuple[str, str]:
    done = client.chat.completions.create(model="m", messages=messages, **kwargs)
    return done.choices[0].message.content, done.choices[0].finish_reason


@pytest.mark.slow
def test_a_seed_samples_the_same_reply_whatever_shares_the_batch(client):
    story = [{"role": "user", "content": "Tell me a short story about a dragon."}]
    sampled = dict(temperature=1, max_tokens=16, extra_body={"do_sample": True})
    first = reply(client, story, seed=3, **sampled)
    with ThreadPoolExecutor(4) as pool:  # the same seed again, beside other requests in the batch
        again, *_ = pool.map(
            lambda kw: reply(client, story, **kw),
            [dict(seed=3, **sampled), dict(seed=4, **sampled), dict(temperature=0, max_tokens=20), dict(**sampled)],
        )
    assert again == first
    others = {reply(client, story, seed=s, **sampled)[0] for s in (4, 5, 6)}
    assert others != {first[0]}  # sampling happened: other seeds tell other stories


@pytest.mark.slow
def test_logit_bias_100_forces_its_token(client, bundled_model):
    (cat,) = bundled_model.tokenizer.encode(" cat")
    text, finish = reply(client, QUESTION, temperature=0, max_tokens=5, logit_bias={str(cat): 100})
    assert (text, finish) == (bundled_model.tokenizer.decode([cat] * 5), "length")
    plain = reply(client, QUESTION, temperature=0, max_tokens=5)[0]
    (first, *_) = bundled_model.tokenizer.encode(plain)
    banned = reply(client, QUESTION, temperature=0, max_tokens=5, logit_bias={str(first): -100})[0]
    assert not bundled_model.tokenizer.encode(banned)[:1] == [first]  # -100 bans the token greedy picked first


@pytest.mark.slow
def test_a_logit_bias_token_outside_the_vocabulary_is_400(client, bundled_model):
    vocab = bundled_model.model.config.vocab_size
    with pytest.raises(openai.BadRequestError) as err:
        reply(client, QUESTION, max_tokens=2, logit_bias={str(vocab): 5})
    assert err.value.body["param"] == "logit_bias" and f"has {vocab} tokens" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        reply(client, QUESTION, max_tokens=2, logit_bias={"12": 101})
    assert err.value.body["param"] == "logit_bias"


@pytest.mark.slow
def test_penalties_break_a_repeating_greedy_reply(client):
    hello = [{"role": "user", "content": "Say the word 'hello' twenty times."}]
    plain = reply(client, hello, temperature=0, max_tokens=40)[0]
    assert plain.lower().count("hello") >= 10
    for penalty in ("frequency_penalty", "presence_penalty"):
        penalized = reply(client, hello, temperature=0, max_tokens=40, **{penalty: 2.0})[0]
        assert penalized != plain and penalized.lower().count("hello") < plain.lower().count("hello")
        assert reply(client, hello, temperature=0, max_tokens=4, **{penalty: -2.0})[1] in ("stop", "length")
        for outside in (3.0, -2.5):
            with pytest.raises(openai.BadRequestError) as err:
                reply(client, hello, max_tokens=2, **{penalty: outside})
            assert err.value.body["param"] == penalty


@pytest.mark.slow
def test_json_object_needs_json_in_the_messages(client):
    with pytest.raises(openai.BadRequestError) as err:
        reply(client, QUESTION, max_tokens=4, response_format={"type": "json_object"})
    assert err.value.body["param"] == "response_format" and "must contain the word 'json'" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        reply(client, QUESTION, max_tokens=4, response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert err.value.body["param"] == "response_format"


JSON_ASKED = [{"role": "user", "content": "Reply in JSON: what is the capital of France?"}]
CUT = dict(temperature=0, max_tokens=30, stop=["."], response_format={"type": "json_object"})  # ends at a '.': no JSON


@pytest.mark.slow
def test_a_reply_that_is_not_json_is_a_500_invalid_json_output(client):
    text, finish = reply(client, JSON_ASKED, **{**CUT, "response_format": None})
    assert finish == "stop"
    with pytest.raises(ValueError):
        json.loads(text)  # what the model says, cut at the stop string, is no JSON
    with pytest.raises(openai.InternalServerError) as err:
        reply(client, JSON_ASKED, **CUT)
    assert err.value.status_code == 500
    assert (err.value.body["type"], err.value.body["code"]) == ("server_error", "invalid_json_output")
    assert "not valid JSON" in err.value.body["message"]


@pytest.mark.slow
def test_a_streamed_reply_that_is_not_json_ends_with_an_error_event(client, handle):
    stream = client.chat.completions.create(model="m", messages=JSON_ASKED, stream=True, **CUT)
    with pytest.raises(openai.APIError) as err:
        for _ in stream:
            pass
    assert "not valid JSON" in err.value.message
    body = {"model": "m", "messages": JSON_ASKED, "stream": True, **CUT}
    with httpx.stream("POST", f"{handle.base_url}/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        data = [line.removeprefix("data: ") for line in resp.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    error = json.loads(data[-2])["error"]
    assert not any(json.loads(d).get("choices", [{}])[0].get("finish_reason") for d in data[:-2])  # no finish chunk
    # the same error as without streaming: a client can tell a non-JSON reply from a failed generation
    assert (error["type"], error["code"]) == ("server_error", "invalid_json_output")


# ----- named adapters ----------------------------------------------------------------------------------------------
def make_adapter(bundled_model, folder: Path, seed: int) -> Path:
    """A random LoRA (r=4 on q_proj and v_proj) for the bundled model, saved to ``folder``; the model's
    weights are shared with the bundled model, not copied."""
    import torch
    from peft import LoraConfig, get_peft_model

    from finetune_kit.models.adapters import quiet_peft, shared_clone

    torch.manual_seed(seed)
    # lora_alpha 16: strong enough that each adapter's greedy answer differs from the base's and the other's
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with quiet_peft():
        get_peft_model(shared_clone(bundled_model.model), config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(bundled_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"shop": make_adapter(bundled_model, root / "shop", 1), "sql": make_adapter(bundled_model, root / "sql", 2)}


N = 10  # new tokens per reply in the adapter tests


@pytest.fixture(scope="module")
def expected(bundled_model, adapters) -> dict[str, str]:
    """Each served model's greedy answer to QUESTION, from a LoadedModel of its own."""
    answers = {"base": greedy(bundled_model, QUESTION, N).text}
    for name, folder in adapters.items():
        answers[name] = greedy(bundled_model.with_adapter(folder), QUESTION, N).text
    return answers


@pytest.fixture(scope="module")
def multi_server(bundled_model, adapters):
    served = bundled_model.with_named_adapters(adapters)  # shares the bundled model's weights
    return Server(served, ServeConfig(**LOCAL), GenerationConfig(do_sample=False, max_new_tokens=N))


@pytest.fixture(scope="module")
def multi(multi_server):
    with multi_server.start() as running:
        yield running


@pytest.mark.slow
def test_the_adapters_answer_differently(expected):
    assert len(set(expected.values())) == 3, expected


@pytest.mark.slow
def test_models_and_tags_list_the_base_and_each_adapter(multi):
    base = multi.model_name
    assert base == "smollm2-135m-instruct"
    client = openai.OpenAI(api_key="0", base_url=multi.base_url, max_retries=0)
    assert [m.id for m in client.models.list().data] == [base, "shop", "sql"]
    assert client.models.retrieve("shop").id == "shop"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("nope")
    assert err.value.body["code"] == "model_not_found"
    tags = ollama.Client(host=multi.url).list().models
    assert [t.model for t in tags] == [f"{base}:latest", "shop:latest", "sql:latest"]
    assert [m.model for m in ollama.Client(host=multi.url).ps().models] == [t.model for t in tags]


@pytest.mark.slow
def test_a_requests_model_picks_its_adapter(multi, expected):
    client = openai.OpenAI(api_key="0", base_url=multi.base_url, max_retries=0)
    ol = ollama.Client(host=multi.url)
    options = {"temperature": 0, "num_predict": N}
    shop = client.chat.completions.create(model="shop", messages=QUESTION, temperature=0)
    assert (shop.model, shop.choices[0].message.content) == ("shop", expected["shop"])
    sql = ol.chat(model="sql:latest", messages=QUESTION, options=options, stream=False)
    assert sql.message.content == expected["sql"]
    base = client.chat.completions.create(model=multi.model_name, messages=QUESTION, temperature=0)
    assert (base.model, base.choices[0].message.content) == (multi.model_name, expected["base"])
    streamed = "".join(
        c.message.content for c in ol.chat(model="shop", messages=QUESTION, options=options, stream=True)
    )
    assert streamed == expected["shop"]
    generated = ol.generate(model=f"{multi.model_name}:latest", prompt=QUESTION[0]["content"], options=options)
    assert generated.response == expected["base"]


@pytest.mark.slow
def test_an_unknown_model_is_404_when_adapters_are_named(multi):
    client = openai.OpenAI(api_key="0", base_url=multi.base_url, max_retries=0)
    for call in (
        lambda: client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=2),
        lambda: client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=2, stream=True),
        lambda: client.completions.create(model="gpt-4o", prompt="Hi", max_tokens=2),
    ):
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert (err.value.body["code"], err.value.body["param"]) == ("model_not_found", "model")
        assert "'shop'" in err.value.body["message"] and "'sql'" in err.value.body["message"]
    ol = ollama.Client(host=multi.url)
    for call in (
        lambda: ol.chat(model="llama3", messages=QUESTION, stream=False),
        lambda: ol.generate(model="llama3", prompt="Hi"),
        lambda: ol.show("llama3"),
    ):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 404 and "not found" in err.value.error


@pytest.mark.slow
def test_mixed_adapter_requests_in_one_batch_each_get_their_own_answer(multi_server, multi, expected):
    client = openai.OpenAI(api_key="0", base_url=multi.base_url, max_retries=0, timeout=120)
    ol = ollama.Client(host=multi.url, timeout=120)
    options = {"temperature": 0, "num_predict": N}
    names = {"base": multi.model_name, "shop": "shop", "sql": "sql"}

    def ask(i: int) -> tuple[str, str]:
        which = list(names)[i % 3]
        if i % 2:
            answer = ol.chat(model=names[which], messages=QUESTION, options=options, stream=False).message.content
        else:
            done = client.chat.completions.create(model=names[which], messages=QUESTION, temperature=0)
            answer = done.choices[0].message.content
        return which, answer

    with ThreadPoolExecutor(18) as pool:
        answers = list(pool.map(ask, range(18)))
    assert [a for _, a in answers] == [expected[which] for which, _ in answers]
    assert multi_server.app.state.runner._scheduler.peak_batch > 3  # adapters were mixed in one batch
