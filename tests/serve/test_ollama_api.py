"""Ollama's native API: a real Server on 127.0.0.1, driven by the official ``ollama`` client and raw httpx.

The tiny Llama shows that answers equal the model's (and the OpenAI route's); ``ScriptedEngine``
gives exact replies for what a random model cannot show (a reply cut by num_predict, JSON or not,
an engine failing mid-stream, both APIs sharing one slot).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import httpx
import ollama
import openai
import pytest

from finetune_kit.export.ollama import go_template
from finetune_kit.models.engine import Completion, Engine
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.serve import ServeConfig, Server
from finetune_kit.serve.ollama_api import OLLAMA_VERSION

LOCAL = dict(api_host="127.0.0.1", api_port=0, api_key=None, api_model_name=None)
HELLO = [{"role": "user", "content": "Hello! Who are you?"}]
GREEDY = {"temperature": 0}


def greedy(model, messages, max_new_tokens):
    return model.generate([messages], GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens))[0]


@pytest.fixture(scope="module")
def handle(tiny_llama):
    with Server(
        tiny_llama, ServeConfig(**LOCAL), GenerationConfig(do_sample=False, max_new_tokens=16)
    ).start() as running:
        yield running


@pytest.fixture()
def client(handle):
    return ollama.Client(host=handle.url)


def post(handle, path, body, **kwargs):
    return httpx.post(f"{handle.url}{path}", json=body, timeout=60, **kwargs)


# ----- the served model: /, /api/version, /api/tags, /api/ps, /api/show -----------------------------------
def test_root_and_version_answer_like_ollama(handle):
    assert httpx.get(f"{handle.url}/").text == "Ollama is running"
    assert httpx.head(f"{handle.url}/").status_code == 200
    assert httpx.get(f"{handle.url}/api/version").json() == {"version": OLLAMA_VERSION}
    assert re.fullmatch(r"\d+\.\d+\.\d+", OLLAMA_VERSION)
    assert httpx.get(f"{handle.url}/health").json() == {"status": "ok", "model": "tiny-llama"}  # still there


def test_tags_give_the_fields_open_webui_reads(handle, client, tiny_llama):
    (model,) = httpx.get(f"{handle.url}/api/tags").json()["models"]
    assert model["name"] == model["model"] == "tiny-llama:latest"  # open-webui keys on `model`, with a tag
    assert datetime.fromisoformat(model["modified_at"]).tzinfo is not None
    assert model["size"] == sum(p.numel() * p.element_size() for p in tiny_llama.model.parameters())
    assert re.fullmatch(r"[0-9a-f]{64}", model["digest"])
    n = sum(p.numel() for p in tiny_llama.model.parameters())
    assert model["details"] == {
        "parent_model": "",
        "format": "safetensors",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": f"{n / 1e6:.2f}M",
        "quantization_level": "F32",
    }
    listed = client.list().models[0]
    assert (listed.model, listed.size, listed.digest) == ("tiny-llama:latest", model["size"], model["digest"])


def test_ps_lists_the_loaded_model_forever(client, tiny_llama):
    (running,) = client.ps().models
    assert (running.name, running.model, running.size_vram, running.context_length) == (
        "tiny-llama:latest",
        "tiny-llama:latest",
        0,
        512,
    )
    assert running.expires_at > datetime.now(timezone.utc) + timedelta(days=365 * 200)  # `ollama ps`: Forever


def test_show_gives_the_go_template_and_model_info(handle, client, tiny_llama):
    shown = client.show("tiny-llama")
    assert shown.template == go_template(tiny_llama.template, tiny_llama.tokenizer)
    assert shown.capabilities == ["completion"]
    assert shown.details.family == "llama" and shown.details.format == "safetensors"
    info = shown.modelinfo
    assert (info["general.architecture"], info["llama.context_length"], info["llama.block_count"]) == ("llama", 512, 2)
    assert info["general.parameter_count"] == sum(p.numel() for p in tiny_llama.model.parameters())
    assert "TEMPLATE" in shown.modelfile and 'PARAMETER stop "<|im_end|>"' in shown.modelfile
    assert re.search(r"^num_predict +16$", shown.parameters, re.M)
    legacy = post(handle, "/api/show", {"name": "TINY-LLAMA:latest"})  # older clients send `name`; any case
    assert legacy.status_code == 200 and legacy.json()["template"] == shown.template


# ----- generating: /api/chat and /api/generate ---------------------------------------------------------------
def test_greedy_chat_equals_the_openai_route(handle, client):
    answer = client.chat(model="tiny-llama", messages=HELLO, stream=False, options={**GREEDY, "num_predict": 8})
    oa = openai.OpenAI(api_key="0", base_url=handle.base_url, max_retries=0)
    same = oa.chat.completions.create(model="tiny-llama", messages=HELLO, max_tokens=8, temperature=0)
    assert (answer.message.role, answer.message.content) == ("assistant", same.choices[0].message.content)
    assert (answer.model, answer.done, answer.done_reason) == ("tiny-llama", True, same.choices[0].finish_reason)
    assert answer.prompt_eval_count == same.usage.prompt_tokens
    assert (answer.eval_count or 0) == same.usage.completion_tokens
    assert answer.total_duration >= answer.load_duration + answer.prompt_eval_duration > 0


def test_streamed_chat_adds_up_to_the_whole_reply(client, tiny_llama):
    chunks = list(client.chat(model="tiny-llama:latest", messages=HELLO, stream=True, options={"num_predict": 8}))
    *pieces, last = chunks
    expected = greedy(tiny_llama, HELLO, 8)
    assert not any(c.done for c in pieces) and all(c.message.role == "assistant" for c in chunks)
    assert "".join(c.message.content for c in pieces) == expected.text
    assert (last.done, last.message.content, last.done_reason) == (True, "", expected.finish_reason)
    assert (last.eval_count or 0) == expected.completion_tokens
    assert last.prompt_eval_count == len(tiny_llama.encode_prompt(HELLO))


def test_ndjson_wire_format(handle):
    body = {"model": "tiny-llama", "messages": HELLO, "options": {"num_predict": 4}}
    with httpx.stream("POST", f"{handle.url}/api/chat", json=body, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        objects = [json.loads(line) for line in resp.iter_lines() if line]
    assert all(o["created_at"].endswith("Z") and datetime.fromisoformat(o["created_at"]) for o in objects)
    assert set(objects[0]) == {"model", "created_at", "message", "done"}
    final = objects[-1]
    assert {"done_reason", "total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration"} <= set(final)
    whole = post(handle, "/api/chat", {**body, "stream": False})
    assert whole.headers["content-type"].startswith("application/json")
    assert whole.json()["message"]["content"] == "".join(o["message"]["content"] for o in objects)


def test_generate_answers_the_prompt_with_the_system_message(client, tiny_llama):
    system = "You are brief."
    expected = greedy(tiny_llama, [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}], 6)
    whole = client.generate(model="tiny-llama", prompt="Hi", system=system, options={"num_predict": 6})
    assert (whole.response, whole.done_reason, whole.eval_count or 0) == (
        expected.text,
        expected.finish_reason,
        expected.completion_tokens,
    )
    streamed = list(
        client.generate(model="tiny-llama", prompt="Hi", system=system, stream=True, options={"num_predict": 6})
    )
    assert "".join(c.response for c in streamed) == expected.text and streamed[-1].done


def test_num_predict_limits_the_reply(client, tiny_llama):
    expected = greedy(tiny_llama, HELLO, 3)
    answer = client.chat(model="tiny-llama", messages=HELLO, options={"num_predict": 3}, stream=False)
    assert (answer.done_reason, answer.eval_count) == (expected.finish_reason, expected.completion_tokens)
    assert answer.done_reason == "length" and answer.eval_count == 3  # the random model says no EOS this soon


def test_empty_requests_load_or_unload_at_once(handle):
    for path, body, reason in [
        ("/api/chat", {"model": "tiny-llama", "messages": []}, "load"),
        ("/api/chat", {"model": "tiny-llama", "keep_alive": 0}, "unload"),
        ("/api/generate", {"model": "tiny-llama", "prompt": ""}, "load"),
        ("/api/generate", {"model": "tiny-llama:latest", "keep_alive": "0s"}, "unload"),
    ]:
        answer = post(handle, path, body).json()
        assert (answer["done"], answer["done_reason"], answer["model"]) == (True, reason, body["model"])


def test_abandoned_stream_frees_its_slot(handle, client):
    body = {"model": "tiny-llama", "messages": HELLO, "options": {"num_predict": 200}}
    with httpx.stream("POST", f"{handle.url}/api/chat", json=body, timeout=60) as resp:
        first = json.loads(next(resp.iter_lines()))
    assert first["done"] is False
    # the one slot is held until the abandoned generation ends, then this request is served
    assert client.chat(model="tiny-llama", messages=HELLO, options={"num_predict": 2}, stream=False).done


# ----- errors -------------------------------------------------------------------------------------------------------
def test_unknown_model_is_404(client):
    for call in (
        lambda: client.chat(model="llama3", messages=HELLO, stream=False),
        lambda: client.generate(model="llama3:8b", prompt="hi"),
        lambda: client.show("llama3"),
    ):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert (
            err.value.status_code == 404
            and err.value.error.startswith("model 'llama3")
            and "not found" in err.value.error
        )


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"model": "tiny-llama", "messages": "hi"}, "'messages'"),
        ({"model": "tiny-llama", "messages": HELLO, "options": {"temperature": "hot"}}, "'options.temperature'"),
        ({"model": "tiny-llama", "messages": HELLO, "options": {"num_predict": 1.5}}, "'options.num_predict'"),
        ({"messages": HELLO}, "model is required"),
        ({"model": "tiny-llama", "messages": [{"role": "tool", "content": "42"}]}, "messages[0].role"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "a", "images": ["aGk="]}]}, "images"),
        ({"model": "tiny-llama", "messages": [*HELLO, {"role": "assistant", "content": "I"}]}, "end with a user"),
        ({"model": "tiny-llama", "messages": HELLO, "tools": [{"type": "function"}]}, "does not support tools"),
        ({"model": "tiny-llama", "messages": HELLO, "think": True}, "does not support thinking"),
        ({"model": "tiny-llama", "messages": HELLO, "format": {"type": "object"}}, "JSON schema"),
        ({"model": "tiny-llama", "messages": HELLO, "format": "yaml"}, "invalid format"),
        ({"model": "tiny-llama", "messages": HELLO, "keep_alive": "soon"}, "keep_alive"),
        ({"model": "tiny-llama", "messages": HELLO, "logprobs": True}, "logprobs"),
    ],
)
def test_bad_chat_requests_are_400_naming_the_field(handle, body, words):
    resp = post(handle, "/api/chat", body)
    assert resp.status_code == 400 and set(resp.json()) == {"error"}
    assert words in resp.json()["error"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"prompt": "hi", "raw": True}, "raw"),
        ({"prompt": "hi", "suffix": "end"}, "does not support insert"),
        ({"prompt": "hi", "template": "{{ .Prompt }}"}, "Go template"),
        ({"prompt": "hi", "context": [1, 2]}, "context"),
        ({"prompt": "hi", "images": ["aGk="]}, "text-only"),
    ],
)
def test_what_the_engine_cannot_do_is_refused(handle, body, words):
    resp = post(handle, "/api/generate", {"model": "tiny-llama", **body})
    assert resp.status_code == 400 and words in resp.json()["error"]


def test_malformed_bodies_and_routes_get_ollama_shaped_errors(handle):
    bad_json = httpx.post(f"{handle.url}/api/chat", content=b"{nope", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]
    assert httpx.post(f"{handle.url}/api/chat").json() == {"error": "missing request body"}
    assert post(handle, "/api/chat", [1]).status_code == 400
    wrong_method = httpx.get(f"{handle.url}/api/chat")
    assert wrong_method.status_code == 405 and "not allowed" in wrong_method.json()["error"]
    missing = post(handle, "/api/pull", {"model": "x"})
    assert missing.status_code == 404 and "/api/pull" in missing.json()["error"]


def test_api_key_protects_api_routes(tiny_llama):
    server = Server(tiny_llama, ServeConfig(**{**LOCAL, "api_key": "sk-right"}), GenerationConfig(max_new_tokens=2))
    with server.start() as running:
        right = ollama.Client(host=running.url, headers={"Authorization": "Bearer sk-right"})
        assert right.chat(model="tiny-llama", messages=HELLO, stream=False).done
        assert [m.model for m in right.list().models] == ["tiny-llama:latest"]
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
            with pytest.raises(ollama.ResponseError) as err:
                ollama.Client(host=running.url, headers=headers).list()
            assert err.value.status_code == 401 and err.value.error.startswith("unauthorized")
        assert httpx.get(f"{running.url}/api/version").status_code == 401
        assert httpx.get(f"{running.url}/").status_code == 200 and httpx.get(f"{running.url}/health").status_code == 200


# ----- exact behaviour with a scripted engine ----------------------------------------------------------------------
class ScriptedEngine:
    """Replies ``self.reply`` one word per token (max_new_tokens cuts it), records settings and overlap."""

    name, context_length, max_concurrency = "scripted", 100, 4

    def __init__(self) -> None:
        self.reply, self.fail_after, self.delay = '{"answer": 42}', None, 0.0
        self.seen: list[GenerationConfig] = []
        self.active = self.peak = 0
        self._lock = threading.Lock()

    def render_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages)

    def encode_prompt(self, messages, system=None) -> list[int]:
        return [ord(c) for c in self.render_prompt(messages)]

    def _run(self, messages, generation) -> Iterator[str | Completion]:
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            self.seen.append(generation)
            time.sleep(self.delay)
            words = self.reply.split(" ")
            pieces = [w if i == 0 else f" {w}" for i, w in enumerate(words)][: generation.max_new_tokens]
            for i, piece in enumerate(pieces):
                if i == self.fail_after:
                    raise RuntimeError("the engine broke")
                yield piece
            reason = "length" if len(words) > len(pieces) else "stop"
            yield Completion("".join(pieces), len(self.encode_prompt(messages)), len(pieces), reason)
        finally:
            with self._lock:
                self.active -= 1

    def generate(self, conversations, generation=None, *, batch_size=8, stop=()) -> list[Completion]:
        return [list(self._run(c, generation))[-1] for c in conversations]

    def stream(self, messages, generation=None, *, system=None, stop=()) -> Iterator[str | Completion]:
        return self._run(messages, generation)


@pytest.fixture(scope="module")
def engine():
    return ScriptedEngine()


@pytest.fixture(scope="module")
def scripted(engine):
    assert isinstance(engine, Engine)
    with Server(engine, ServeConfig(**LOCAL)).start() as running:
        yield running


@pytest.fixture()
def fresh(engine):
    yield engine
    engine.reply, engine.fail_after, engine.delay = '{"answer": 42}', None, 0.0


def test_options_reach_the_engine(scripted, fresh):
    client = ollama.Client(host=scripted.url)
    fresh.reply = "one two three four"
    opts = {"temperature": 0.5, "top_p": 0.8, "top_k": 5, "repeat_penalty": 1.3, "num_predict": 2, "mirostat": 1}
    cut = client.chat(model="scripted", messages=HELLO, options=opts, stream=False)
    assert (cut.message.content, cut.done_reason, cut.eval_count) == ("one two", "length", 2)
    gen = fresh.seen[-1]
    assert (gen.temperature, gen.top_p, gen.top_k, gen.repetition_penalty, gen.max_new_tokens) == (0.5, 0.8, 5, 1.3, 2)
    client.chat(model="scripted", messages=HELLO, options={"num_predict": -1, "temperature": 0}, stream=False)
    prompt = len(fresh.encode_prompt(HELLO))
    assert (fresh.seen[-1].max_new_tokens, fresh.seen[-1].greedy) == (100 - prompt, True)  # up to the context


def test_format_json_checks_the_reply(scripted, fresh):
    client = ollama.Client(host=scripted.url)
    assert json.loads(client.generate(model="scripted", prompt="q", format="json").response) == {"answer": 42}
    fresh.reply = "not json at all"
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="scripted", prompt="q", format="json")
    assert err.value.status_code == 500 and 'format "json"' in err.value.error and "not json at all" in err.value.error
    with pytest.raises(ollama.ResponseError, match='format "json"'):
        list(client.chat(model="scripted", messages=HELLO, format="json", stream=True))  # ends on an error line


def test_engine_failing_mid_stream_ends_with_an_error_line(scripted, fresh):
    fresh.reply, fresh.fail_after = "one two three", 1
    with httpx.stream("POST", f"{scripted.url}/api/chat", json={"model": "scripted", "messages": HELLO}) as resp:
        objects = [json.loads(line) for line in resp.iter_lines() if line]
    assert objects[0]["message"]["content"] == "one"
    assert objects[-1] == {"error": "generation failed: RuntimeError: the engine broke"}
    whole = post(scripted, "/api/generate", {"model": "scripted", "prompt": "q", "stream": False})
    assert whole.status_code == 500 and "the engine broke" in whole.json()["error"]


def test_both_apis_share_one_concurrency_limit(engine, fresh):
    fresh.delay, fresh.peak = 0.2, 0
    with Server(engine, ServeConfig(**LOCAL, max_concurrent=1)).start() as serial:
        ol = ollama.Client(host=serial.url)
        oa = openai.OpenAI(api_key="0", base_url=serial.base_url, max_retries=0)
        calls = [lambda: ol.chat(model="scripted", messages=HELLO, stream=False).message.content] * 2
        calls += [lambda: oa.chat.completions.create(model="x", messages=HELLO).choices[0].message.content] * 2
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda call: call(), calls))
    assert replies == ['{"answer": 42}'] * 4
    assert fresh.peak == 1  # max_concurrent=1 holds across /api and /v1


@pytest.mark.slow
def test_bundled_model_knows_paris_through_the_ollama_client(bundled_model):
    server = Server(bundled_model, ServeConfig(**LOCAL), GenerationConfig(max_new_tokens=32))
    question = [{"role": "user", "content": "What is the capital of France?"}]
    with server.start() as running:
        client = ollama.Client(host=running.url)
        name = client.list().models[0].model
        plain = client.chat(model=name, messages=question, options=GREEDY, stream=False)
        streamed = "".join(
            c.message.content for c in client.chat(model=name, messages=question, options=GREEDY, stream=True)
        )
        shown = client.show(name)
    assert "Paris" in plain.message.content and streamed == plain.message.content
    assert shown.template.startswith("{{- $system := .System }}") and shown.details.family == "llama"
