"""The app over any :class:`Engine`: a small deterministic engine, no Hugging Face model involved.

``EchoEngine`` implements the protocol and nothing more, so these tests show what ``serve/``
needs from a backend (a vLLM or llama.cpp engine later): its name, its context length, its
concurrency, prompt encoding, batch generation and streaming.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from finetune_kit.errors import RequestError
from finetune_kit.models.engine import Completion, Engine
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.serve import ServeConfig, Server
from finetune_kit.serve.protocol import Usage

LOCAL = dict(api_host="127.0.0.1", api_port=0, api_key=None, api_model_name=None)
HELLO = [{"role": "user", "content": "hello there"}]


class EchoEngine:
    """Replies ``"echo: <last user message>"`` one word per token; a prompt takes one token per character."""

    def __init__(
        self,
        *,
        name: str = "echo-engine",
        context_length: int | None = 200,
        max_concurrency: int = 1,
        delay: float = 0.0,
    ) -> None:
        self._name, self._context, self._concurrency, self.delay = name, context_length, max_concurrency, delay
        self.generations: list[GenerationConfig | None] = []
        self.active = self.peak = 0
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self._name

    @property
    def context_length(self) -> int | None:
        return self._context

    @property
    def max_concurrency(self) -> int:
        return self._concurrency

    def render_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def encode_prompt(self, messages: str | Sequence[dict[str, str]], system: str | None = None) -> list[int]:
        msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        if system is not None:
            msgs.insert(0, {"role": "system", "content": system})
        return [ord(c) for c in self.render_prompt(msgs)]

    def pieces(
        self, messages: Sequence[dict[str, str]], generation: GenerationConfig | None = None, stop: Sequence[str] = ()
    ) -> tuple[list[str], str]:
        """The reply's text pieces (one per token) and its finish reason."""
        limit = (generation or GenerationConfig()).max_new_tokens
        words = f"echo: {messages[-1]['content']}".split(" ")
        pieces = [w if i == 0 else f" {w}" for i, w in enumerate(words)]
        text, out = "", []
        for piece in pieces[:limit]:
            cut = min((i for s in stop if (i := (text + piece).find(s)) >= 0), default=None)
            if cut is not None:
                if cut > len(text):
                    out.append((text + piece)[len(text) : cut])
                return out, "stop"
            out.append(piece)
            text += piece
        return out, "length" if len(pieces) > limit else "stop"

    def _completion(
        self, messages: Sequence[dict[str, str]], generation: GenerationConfig | None, stop: Sequence[str]
    ) -> Completion:
        pieces, reason = self.pieces(messages, generation, stop)
        return Completion("".join(pieces), len(self.encode_prompt(messages)), len(pieces), reason)

    def generate(
        self,
        conversations: Sequence[Sequence[dict[str, str]]],
        generation: GenerationConfig | None = None,
        *,
        batch_size: int = 8,
        stop: Sequence[str] = (),
    ) -> list[Completion]:
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            self.generations.append(generation)
            time.sleep(self.delay)
            return [self._completion(c, generation, stop) for c in conversations]
        finally:
            with self._lock:
                self.active -= 1

    def stream(
        self,
        messages: str | Sequence[dict[str, str]],
        generation: GenerationConfig | None = None,
        *,
        system: str | None = None,
        stop: Sequence[str] = (),
    ) -> Iterator[str | Completion]:
        msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        pieces, _ = self.pieces(msgs, generation, stop)
        yield from pieces
        yield self._completion(msgs, generation, stop)


@pytest.fixture(scope="module")
def engine() -> EchoEngine:
    return EchoEngine()


@pytest.fixture(scope="module")
def handle(engine):
    with Server(engine, ServeConfig(**LOCAL)).start() as running:
        yield running


@pytest.fixture()
def client(handle):
    return openai.OpenAI(api_key="0", base_url=handle.base_url, max_retries=0)


def test_the_fake_engine_satisfies_the_protocol(engine):
    assert isinstance(engine, Engine)


def test_models_shows_the_engine_name(client, handle):
    assert [m.id for m in client.models.list().data] == ["echo-engine"]
    assert client.models.retrieve("echo-engine").id == "echo-engine"
    assert httpx.get(f"{handle.url}/health").json() == {"status": "ok", "model": "echo-engine"}
    assert handle.model_name == "echo-engine"


def test_chat_completion_returns_the_engine_text_and_usage(client, engine):
    resp = client.chat.completions.create(model="anything", messages=HELLO)
    assert resp.model == "echo-engine"
    assert resp.choices[0].message.content == "echo: hello there"
    assert resp.choices[0].finish_reason == "stop"
    prompt = len(engine.encode_prompt(HELLO))
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (prompt, 3, prompt + 3)


def test_n_choices_count_the_prompt_once(client, engine):
    resp = client.chat.completions.create(model="x", messages=HELLO, n=3, max_tokens=2)
    assert [c.message.content for c in resp.choices] == ["echo: hello"] * 3
    assert [c.finish_reason for c in resp.choices] == ["length"] * 3
    prompt = len(engine.encode_prompt(HELLO))
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (prompt, 6, prompt + 6)


def test_request_settings_reach_the_engine(client, engine):
    client.chat.completions.create(model="x", messages=HELLO, max_tokens=7, temperature=0.5)
    assert (engine.generations[-1].max_new_tokens, engine.generations[-1].temperature) == (7, 0.5)
    client.chat.completions.create(model="x", messages=HELLO)
    assert engine.generations[-1].greedy  # a Server built in Python decodes greedily by default


def test_stop_strings_reach_the_engine(client):
    resp = client.chat.completions.create(model="x", messages=HELLO, stop=[" the"])
    assert (resp.choices[0].message.content, resp.choices[0].finish_reason) == ("echo: hello", "stop")


def test_streaming_yields_the_engine_pieces(client, engine):
    chunks = list(
        client.chat.completions.create(model="x", messages=HELLO, stream=True, stream_options={"include_usage": True})
    )
    first, *middle, last, usage = chunks
    assert (first.choices[0].delta.role, first.choices[0].delta.content) == ("assistant", "")
    assert [c.choices[0].delta.content for c in middle] == engine.pieces(HELLO)[0] == ["echo:", " hello", " there"]
    assert last.choices[0].finish_reason == "stop" and last.choices[0].delta.content is None
    prompt = len(engine.encode_prompt(HELLO))
    assert (usage.choices, usage.usage.prompt_tokens, usage.usage.completion_tokens) == ([], prompt, 3)


def test_context_length_comes_from_the_engine(client, engine):
    fits = [{"role": "user", "content": "a" * 150}]
    assert len(engine.encode_prompt(fits)) < 200
    assert client.chat.completions.create(model="x", messages=fits).choices[0].message.content.startswith("echo:")
    too_long = [{"role": "user", "content": "a" * 200}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="x", messages=too_long)
    assert err.value.body["code"] == "context_length_exceeded" and err.value.body["param"] == "messages"
    assert (
        f"maximum context length is 200 tokens, but the messages take {len(engine.encode_prompt(too_long))}"
        in err.value.message
    )


def test_unknown_context_length_is_not_enforced():
    with Server(EchoEngine(context_length=None), ServeConfig(**LOCAL)).start() as running:
        client = openai.OpenAI(api_key="0", base_url=running.base_url, max_retries=0)
        reply = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "a" * 5000}])
    assert reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(("max_concurrent", "engine_limit", "peak"), [(4, 1, 1), (2, 4, 2)])
def test_concurrency_is_the_smaller_of_config_and_engine(max_concurrent, engine_limit, peak):
    engine = EchoEngine(max_concurrency=engine_limit, delay=0.3)
    server = Server(engine, ServeConfig(**{**LOCAL, "max_concurrent": max_concurrent}))
    with server.start() as running:
        client = openai.OpenAI(api_key="0", base_url=running.base_url, max_retries=0)
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: client.chat.completions.create(model="x", messages=HELLO), range(4)))
    assert [r.choices[0].message.content for r in replies] == ["echo: hello there"] * 4
    assert engine.peak == peak
    assert f"{max_concurrent} generating at once" in server.explain()


def test_api_model_name_wins_over_the_engine_name(engine):
    server = Server(engine, ServeConfig(**{**LOCAL, "api_model_name": "shop-bot"}))
    assert server.model is engine and server.model_name == "shop-bot"
    with server.start() as running:
        assert httpx.get(f"{running.base_url}/models").json()["data"][0]["id"] == "shop-bot"


class NoFinalCompletion(EchoEngine):
    def stream(self, messages, generation=None, *, system=None, stop=()):  # type: ignore[override]
        yield "half a reply"


def test_a_stream_without_a_completion_ends_with_an_error_event():
    with Server(NoFinalCompletion(), ServeConfig(**LOCAL)).start() as running:
        body = {"messages": HELLO, "stream": True}
        with httpx.stream("POST", f"{running.base_url}/chat/completions", json=body, timeout=30) as resp:
            raw = resp.read().decode()
    data = [line.removeprefix("data: ") for line in raw.splitlines() if line.startswith("data: ")]
    assert json.loads(data[1])["choices"][0]["delta"] == {"content": "half a reply"}
    assert data[-1] == "[DONE]"
    error = json.loads(data[-2])["error"]
    assert error["type"] == "server_error" and "ended without a Completion" in error["message"]


def test_usage_of_completions():
    done = [Completion("a b", 10, 2, "stop"), Completion("a", 10, 1, "length")]
    assert Usage.of(done) == Usage(prompt_tokens=10, completion_tokens=3, total_tokens=13)
    assert Usage.of(done[:1]).total_tokens == 12


def test_request_error_body_is_openai_shaped():
    error = RequestError("bad", param="messages", code="x")
    assert isinstance(error, ValueError)
    assert error.body() == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "messages", "code": "x"}
    }
