"""Server: a real uvicorn server on 127.0.0.1, driven by the real ``openai`` client and raw httpx."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from finetune_kit.errors import ConfigError
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.serve import ServeConfig, Server

HELLO = [{"role": "user", "content": "Hello! Who are you?"}]
LOCAL = dict(api_host="127.0.0.1", api_port=0, api_key=None, api_model_name=None)


def greedy(model, messages, max_new_tokens, stop=()):
    return model.generate([messages], GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens), stop=stop)[0]


@pytest.fixture(scope="module")
def handle(tiny_llama):
    server = Server(tiny_llama, ServeConfig(**LOCAL), GenerationConfig(max_new_tokens=16))
    with server.start() as running:
        yield running
    assert not running.running


@pytest.fixture()
def client(handle):
    return openai.OpenAI(api_key="0", base_url=handle.base_url, max_retries=0)


def test_models_list_and_retrieve(client):
    models = client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [("tiny-llama", "model", "finetune_kit")]
    assert models[0].created > 1_600_000_000
    assert client.models.retrieve("tiny-llama").id == "tiny-llama"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4")
    assert err.value.body["code"] == "model_not_found"


def test_chat_non_streaming_matches_the_model(client, tiny_llama):
    resp = client.chat.completions.create(model="tiny-llama", messages=HELLO, max_tokens=5, temperature=0)
    expected = greedy(tiny_llama, HELLO, 5)
    choice = resp.choices[0]
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.model == "tiny-llama"
    assert (choice.index, choice.message.role, choice.message.content) == (0, "assistant", expected.text)
    assert resp.usage.prompt_tokens == len(tiny_llama.encode_prompt(HELLO))
    assert resp.usage.completion_tokens <= 5
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert choice.finish_reason == ("length" if resp.usage.completion_tokens == 5 else "stop")
    assert choice.finish_reason == expected.finish_reason


def test_max_completion_tokens_wins_over_max_tokens(client):
    resp = client.chat.completions.create(
        model="x", messages=HELLO, temperature=0, max_tokens=12, max_completion_tokens=3
    )
    assert resp.usage.completion_tokens <= 3
    longer = client.chat.completions.create(model="x", messages=HELLO, temperature=0, max_tokens=12)
    assert longer.usage.completion_tokens > 3  # the random tiny model does not stop this early


def test_streaming_equals_non_streaming(client):
    plain = client.chat.completions.create(model="x", messages=HELLO, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="x", messages=HELLO, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    first, *middle, last, usage_chunk = chunks
    assert (first.choices[0].delta.role, first.choices[0].delta.content) == ("assistant", "")
    assert all(c.choices[0].finish_reason is None for c in [first, *middle])
    assert last.choices[0].delta.content is None and last.choices[0].finish_reason == plain.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content for c in middle) == plain.choices[0].message.content
    assert usage_chunk.choices == [] and usage_chunk.usage == plain.usage


def test_raw_sse_wire_format(handle):
    body = {"model": "x", "messages": HELLO, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{handle.base_url}/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e and not e.startswith(":")]
    assert raw.endswith("data: [DONE]\n\n") and events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all("finish_reason" in c["choices"][0] for c in chunks)  # present, null until the end
    assert [c["choices"][0]["finish_reason"] for c in chunks][:-1] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all("usage" not in c for c in chunks)  # no include_usage asked


def test_llamafactory_tutorial_client(handle, tiny_llama):
    # the pattern of LLaMA-Factory's scripts/api_example: any key, model="test", server defaults
    client = openai.OpenAI(api_key="0", base_url=f"http://{handle.host}:{handle.port}/v1")
    messages = [{"role": "user", "content": "hello, where is Shanghai?"}]
    result = client.chat.completions.create(messages=messages, model="test")
    assert result.choices[0].message.role == "assistant"
    assert result.usage.prompt_tokens == len(tiny_llama.encode_prompt(messages))
    assert 0 < result.usage.completion_tokens <= 16  # server default max_new_tokens
    messages += [
        {"role": "assistant", "content": result.choices[0].message.content},
        {"role": "user", "content": "and Beijing?"},
    ]
    follow_up = client.chat.completions.create(messages=messages, model="test")
    assert follow_up.usage.prompt_tokens == len(tiny_llama.encode_prompt(messages))


def test_text_parts_and_system_message(client, tiny_llama):
    parts = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello!"}, {"type": "text", "text": "Hi?"}]},
    ]
    resp = client.chat.completions.create(model="x", messages=parts, max_tokens=6, temperature=0)
    flat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!\nHi?"}]
    assert resp.choices[0].message.content == greedy(tiny_llama, flat, 6).text
    assert resp.usage.prompt_tokens == len(tiny_llama.encode_prompt(flat))


@pytest.mark.parametrize(
    ("messages", "param", "words"),
    [
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1].role", "alternate"),
        ([{"role": "assistant", "content": "a"}], "messages[0].role", "alternate"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages", "last message"),
        ([], "messages", "at least one"),
        ([{"role": "tool", "content": "a"}], "messages[0].role", "not supported"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content",
            "text",
        ),
    ],
)
def test_bad_messages_are_400_naming_the_field(client, messages, param, words):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="x", messages=messages)
    assert err.value.status_code == 400
    assert err.value.body["type"] == "invalid_request_error" and err.value.body["param"] == param
    assert words in err.value.message


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (dict(n=2, stream=True), "n"),
        (dict(temperature=5), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
        (dict(stream_options={"include_usage": True}), "stream_options"),
    ],
)
def test_bad_parameters_are_400_naming_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="x", messages=HELLO, **extra)
    assert err.value.body["param"] == param


def test_framework_validation_errors_are_openai_shaped(handle):
    url = f"{handle.base_url}/chat/completions"
    missing = httpx.post(url, json={"model": "x"})
    not_json = httpx.post(url, content=b"{oops", headers={"content-type": "application/json"})
    wrong_type = httpx.post(url, json={"messages": HELLO, "n": "two"})
    for resp in (missing, not_json, wrong_type):
        assert resp.status_code == 400
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert missing.json()["error"]["param"] == "messages" and "missing" in missing.json()["error"]["message"]
    assert "not valid JSON" in not_json.json()["error"]["message"]
    assert wrong_type.json()["error"]["param"] == "n"
    unknown = httpx.get(f"{handle.base_url}/nope")
    assert unknown.status_code == 404 and unknown.json()["error"]["message"] == "Invalid URL (GET /v1/nope)"


def test_n_choices(client, tiny_llama):
    resp = client.chat.completions.create(model="x", messages=HELLO, n=2, max_tokens=6, temperature=0)
    expected = greedy(tiny_llama, HELLO, 6)
    assert [c.index for c in resp.choices] == [0, 1]
    assert [c.message.content for c in resp.choices] == [expected.text] * 2
    assert resp.usage.completion_tokens == 2 * expected.completion_tokens
    assert resp.usage.prompt_tokens == expected.prompt_tokens


def test_stop_strings_cut_the_text(client, tiny_llama):
    full = greedy(tiny_llama, HELLO, 16).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3 and full.find(stop) > 0
    expected = full[: full.find(stop)]
    resp = client.chat.completions.create(model="x", messages=HELLO, max_tokens=16, temperature=0, stop=stop)
    assert resp.choices[0].message.content == expected and resp.choices[0].finish_reason == "stop"
    chunks = list(
        client.chat.completions.create(
            model="x", messages=HELLO, max_tokens=16, temperature=0, stop=[stop], stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_concurrent_requests_are_served_correctly(client, tiny_llama):
    expected = greedy(tiny_llama, HELLO, 8).text

    def ask(_):
        return client.chat.completions.create(model="x", messages=HELLO, max_tokens=8, temperature=0)

    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(ask, range(4)))
    assert [r.choices[0].message.content for r in replies] == [expected] * 4


def test_abandoned_stream_frees_its_slot(handle, client):
    body = {"model": "x", "messages": HELLO, "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{handle.base_url}/chat/completions", json=body, timeout=60) as resp:
        first = next(resp.iter_lines())
    assert first.startswith("data: ") and '"role":"assistant"' in first
    # the only slot is held until the abandoned generation ends, then this request must be served
    quick = openai.OpenAI(api_key="0", base_url=handle.base_url, max_retries=0, timeout=60)
    assert quick.chat.completions.create(model="x", messages=HELLO, max_tokens=2).usage.completion_tokens <= 2


def test_api_key(tiny_llama):
    server = Server(tiny_llama, ServeConfig(**{**LOCAL, "api_key": "sk-right"}), GenerationConfig(max_new_tokens=4))
    with server.start() as running:
        wrong = openai.OpenAI(api_key="sk-wrong", base_url=running.base_url, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            wrong.chat.completions.create(model="x", messages=HELLO)
        assert err.value.body["message"] == "Invalid API key." and err.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert httpx.get(f"{running.base_url}/models").status_code == 401  # no header at all
        right = openai.OpenAI(api_key="sk-right", base_url=running.base_url, max_retries=0)
        assert right.chat.completions.create(model="x", messages=HELLO).usage.completion_tokens <= 4
        assert httpx.get(f"{running.url}/health").status_code == 200  # probes stay open
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{running.url}/health")


def test_config_reads_env_at_construction(monkeypatch):
    monkeypatch.setenv("API_PORT", "8123")
    monkeypatch.setenv("API_KEY", "k")
    monkeypatch.setenv("API_MODEL_NAME", "my-model")
    config = ServeConfig(api_host="127.0.0.1")
    assert (config.api_host, config.api_port, config.api_key, config.api_model_name) == (
        "127.0.0.1",
        8123,
        "k",
        "my-model",
    )
    assert "k'" not in repr(config) and "***" in repr(config)
    monkeypatch.setenv("API_PORT", "eighty")
    with pytest.raises(ConfigError, match="api_port"):
        ServeConfig()
    monkeypatch.delenv("API_PORT")
    monkeypatch.delenv("API_KEY")
    assert (ServeConfig().api_port, ServeConfig().api_key) == (8000, None)
    with pytest.raises(ConfigError, match="Did you mean 'api_port'"):
        ServeConfig().with_(api_prt=1)


def test_server_is_immutable_and_names_the_model(tiny_llama):
    server = Server(tiny_llama, ServeConfig(**LOCAL))
    renamed = server.with_config(api_model_name="shop-bot")
    assert (server.model_name, renamed.model_name) == ("tiny-llama", "shop-bot")
    assert renamed.model is server.model and renamed is not server
    assert "\n" not in repr(server) and "tiny-llama" in repr(server)
    with renamed.start() as running:
        assert [m.id for m in openai.OpenAI(api_key="0", base_url=running.base_url).models.list()] == ["shop-bot"]
    with pytest.raises(TypeError, match="LoadedModel"):
        Server("bundled:smollm2-135m-instruct")  # type: ignore[arg-type]


def test_a_loadable_is_loaded_once_on_first_use_and_shared(tiny_llama):
    class Source:
        loads = 0

        def load(self):
            Source.loads += 1
            return tiny_llama

        def __repr__(self):
            return "Source()"

    server = Server(Source(), ServeConfig(**LOCAL))
    copy = server.with_generation(max_new_tokens=4).with_config(api_model_name="bot")
    assert "Source() (not loaded)" in server.explain() and Source.loads == 0
    assert copy.model is tiny_llama and server.model is tiny_llama and Source.loads == 1
    assert (server.model_name, copy.model_name) == ("tiny-llama", "bot")
    assert not server.generation.do_sample and copy.generation.max_new_tokens == 4  # greedy by default
    with pytest.raises(dataclasses.FrozenInstanceError):
        server.config = ServeConfig(**LOCAL)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("module", "package"), [("uvicorn", "uvicorn"), ("fastapi", "fastapi"), ("sse_starlette", "sse-starlette")]
)
def test_missing_serve_extra_names_the_pip_command(module, package):
    code = f"""
import sys
sys.modules[{module!r}] = None  # as if not installed
from finetune_kit.errors import MissingDependencyError
from finetune_kit.serve import Server

class NeverLoaded:
    def load(self):
        raise AssertionError("the model was loaded before the serve extra was checked")

for use in (lambda s: s.start(), lambda s: s.run(), lambda s: s.app):
    try:
        use(Server(NeverLoaded()))
    except MissingDependencyError as exc:
        print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert len(lines) == 3, out.stdout + out.stderr
    assert all(
        f"needs the package '{package}'" in line and 'pip install "finetune-kit[serve]"' in line for line in lines
    )


def test_busy_port_fails_at_start_with_a_fix(handle, tiny_llama):
    server = Server(tiny_llama, ServeConfig(**{**LOCAL, "api_port": handle.port}))
    with pytest.raises(OSError, match="api_port"):
        server.start()


def test_import_stays_cheap():
    code = "import sys, finetune_kit.serve as s; s.ServeConfig; s.Server; print('fastapi' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_bundled_model_knows_paris(bundled_model):
    server = Server(bundled_model, ServeConfig(**LOCAL), GenerationConfig(max_new_tokens=32))
    question = [{"role": "user", "content": "What is the capital of France?"}]
    with server.start() as running:
        client = openai.OpenAI(api_key="0", base_url=running.base_url, max_retries=0)
        plain = client.chat.completions.create(model="test", messages=question, temperature=0)
        stream = client.chat.completions.create(model="test", messages=question, temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream)
    assert "Paris" in plain.choices[0].message.content
    assert streamed == plain.choices[0].message.content
