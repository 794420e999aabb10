"""The server under load, over the real bundled model: a real Server on 127.0.0.1 and the official clients.

200 requests in flight at once, mixed over both APIs, must all be served (``max_concurrent`` 32
decode together, the rest queue) and give exactly the serial greedy answers; a client that leaves
a long stream frees its place in the batch at once; a server whose queue is full says so (429 on
``/v1``, 503 on ``/api``) and serves again once there is room.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama
import openai
import pytest

from finetune_kit.models.generation import GenerationConfig
from finetune_kit.serve import ServeConfig, Server

LOCAL = dict(api_host="127.0.0.1", api_port=0, api_key=None, api_model_name=None)
MAX = 12  # new tokens per reply in the load test
REQUESTS = 200
GREEDY = GenerationConfig(do_sample=False, max_new_tokens=MAX)
PROMPTS = [
    "What is the capital of France?",
    "Name a color of the sky.",
    "How many legs does a spider have?",
    "Say hello in Spanish.",
    "What is 2 plus 2?",
    "Name a fruit that is yellow.",
    "What do bees make?",
    "Which planet is closest to the sun?",
    "What is the opposite of cold?",
    "Name a large ocean.",
    "What animal says moo?",
    "How many days are in a week?",
    "What is frozen water called?",
    "Name a musical instrument.",
    "What do plants need to grow?",
    "Who wrote Romeo and Juliet?",
    "What is the largest mammal?",
    "Give me a word that rhymes with cat.",
    "What language is spoken in Brazil?",
    "What gas do humans breathe in?",
]
ROUTES = [
    "openai_chat",
    "openai_chat_stream",
    "openai_completion",
    "ollama_chat",
    "ollama_chat_stream",
    "ollama_generate",
]
LONG = [{"role": "user", "content": "Write a very long essay about the history of the Roman Empire."}]
NO_EOS = {"2": -100}  # SmolLM2's <|im_end|>: banned, so the long reply cannot end by itself


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def plan(i: int) -> tuple[str, int]:
    """Request ``i`` of the load test: its route and the index of its prompt."""
    return ROUTES[i % len(ROUTES)], i % len(PROMPTS)


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture(scope="module")
def serial(bundled_model):
    """The serial greedy answers, one request at a time on the LoadedModel: chat replies for every
    prompt, raw-text continuations for the prompts the completions route gets, and the time taken."""
    started = time.perf_counter()
    chat = {p: bundled_model.generate([user(p)], GREEDY, batch_size=1)[0].text for p in PROMPTS}
    completed = sorted({plan(i)[1] for i in range(REQUESTS) if plan(i)[0] == "openai_completion"})
    raw = {PROMPTS[k]: bundled_model.complete(PROMPTS[k], GREEDY, batch_size=1)[0].text for k in completed}
    return chat, raw, (time.perf_counter() - started) / (len(chat) + len(raw))


@pytest.fixture(scope="module")
def server(bundled_model):
    return Server(bundled_model, ServeConfig(**LOCAL), GREEDY)  # max_concurrent 32, max_queued 256: the defaults


@pytest.fixture(scope="module")
def handle(server):
    with server.start() as running:
        yield running


@pytest.fixture(scope="module")
def scheduler(server, handle):
    return server.app.state.runner._scheduler


def ask(handle, oa: openai.OpenAI, ol: ollama.Client, route: str, prompt: str) -> str:
    """One request of the load test through the official client of its API; the reply text."""
    messages, options, name = user(prompt), {"temperature": 0, "num_predict": MAX}, handle.model_name
    if route == "openai_chat":
        reply = oa.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=MAX)
        return reply.choices[0].message.content
    if route == "openai_chat_stream":
        chunks = oa.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=MAX, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    if route == "openai_completion":
        return oa.completions.create(model=name, prompt=prompt, temperature=0, max_tokens=MAX).choices[0].text
    if route == "ollama_chat":
        return ol.chat(model=name, messages=messages, options=options, stream=False).message.content
    if route == "ollama_chat_stream":
        parts = list(ol.chat(model=name, messages=messages, options=options, stream=True))
        assert parts[-1].done
        return "".join(p.message.content for p in parts)
    assert route == "ollama_generate"
    return ol.generate(model=name, prompt=prompt, options=options, stream=False).response


# ----- 200 requests at once --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_200_concurrent_mixed_requests_all_equal_the_serial_greedy_answers(handle, scheduler, serial):
    chat, raw, serial_each = serial
    limits = httpx.Limits(max_connections=REQUESTS + 10, max_keepalive_connections=REQUESTS + 10)
    oa = openai.OpenAI(
        api_key="0", base_url=handle.base_url, max_retries=0, timeout=300, http_client=httpx.Client(limits=limits)
    )
    ol = ollama.Client(host=handle.url, timeout=300, limits=limits)
    barrier = threading.Barrier(REQUESTS)
    watching, seen = True, {"running": 0, "waiting": 0}

    def watch() -> None:
        while watching:
            running, waiting = scheduler.load
            seen["running"], seen["waiting"] = max(seen["running"], running), max(seen["waiting"], waiting)
            time.sleep(0.01)

    def one(i: int) -> tuple[int, str | BaseException]:
        route, k = plan(i)
        barrier.wait(60)  # every thread sends at the same moment: 200 requests in flight
        try:
            return i, ask(handle, oa, ol, route, PROMPTS[k])
        except BaseException as exc:  # counted as a failure below, with its route
            return i, exc

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(REQUESTS) as pool:
        results = dict(pool.map(one, range(REQUESTS)))
    wall = time.perf_counter() - started
    watching = False
    watcher.join()

    failures = {i: f"{plan(i)[0]}: {r!r}" for i, r in results.items() if isinstance(r, BaseException)}
    assert failures == {}
    assert len(results) == REQUESTS
    wrong = {}
    for i, reply in results.items():
        route, k = plan(i)
        expected = raw[PROMPTS[k]] if route == "openai_completion" else chat[PROMPTS[k]]
        if reply != expected:
            wrong[i] = (route, PROMPTS[k], reply, expected)
    assert wrong == {}
    assert {plan(i)[0] for i in results} == set(ROUTES)
    # the batch was shared: 32 sequences decoded together while the rest queued
    assert scheduler.peak_batch == 32 and seen["running"] == 32 and seen["waiting"] > 0
    assert scheduler.load == (0, 0)
    print(
        f"\n{REQUESTS} concurrent requests: {wall:.1f} s wall; serial greedy: {serial_each:.2f} s per request "
        f"(~{serial_each * REQUESTS:.0f} s for {REQUESTS}); peak batch {scheduler.peak_batch}, "
        f"most waiting {seen['waiting']}"
    )
    assert wall < serial_each * REQUESTS / 2


# ----- a client that leaves -------------------------------------------------------------------------------------
def _cancelled_promptly(handle, scheduler, path: str, body: dict, first_text: Callable[[str], str]) -> None:
    """Stream ``body`` to ``path``, read until the first text arrives, close the connection, and check that the
    generation left the batch within 2 s and that a short request is then served at once."""
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{handle.url}{path}", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()  # held: dropping the iterator would close the connection early
        next(line for line in lines if line and first_text(line))
        assert wait_until(lambda: scheduler.load == (1, 0), timeout=2.0)  # still generating its 400 tokens
    closed = time.perf_counter()
    assert wait_until(lambda: scheduler.load == (0, 0), timeout=2.0), scheduler.load
    freed = time.perf_counter() - closed
    started, name = time.perf_counter(), handle.model_name
    short = httpx.post(
        f"{handle.url}/v1/chat/completions",
        json={"model": name, "messages": user(PROMPTS[0]), "temperature": 0, "max_tokens": 4},
        timeout=60,
    )
    assert short.status_code == 200 and short.json()["choices"][0]["finish_reason"] in ("stop", "length")
    served = time.perf_counter() - started
    print(f"\n{path}: left the batch {freed:.2f} s after the client left; the next request took {served:.2f} s")
    assert served < 5.0


def _sse_text(line: str) -> str:
    data = line.removeprefix("data: ")
    if data == "[DONE]" or not line.startswith("data: "):
        return ""
    choices = json.loads(data)["choices"]
    return (choices[0]["delta"].get("content") or "") if choices else ""


@pytest.mark.slow
def test_leaving_an_openai_stream_cancels_its_generation(handle, scheduler):
    name = handle.model_name
    body = {"model": name, "messages": LONG, "temperature": 0, "max_tokens": 400, "stream": True, "logit_bias": NO_EOS}
    _cancelled_promptly(handle, scheduler, "/v1/chat/completions", body, _sse_text)


@pytest.mark.slow
def test_leaving_an_ollama_stream_cancels_its_generation(handle, scheduler):
    name = handle.model_name
    body = {"model": name, "messages": LONG, "options": {"temperature": 0, "num_predict": 400}}
    _cancelled_promptly(handle, scheduler, "/api/chat", body, lambda line: json.loads(line)["message"]["content"])


# ----- a full queue ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_full_queue_is_refused_with_429_or_503_and_served_again_later(bundled_model):
    server = Server(bundled_model, ServeConfig(**LOCAL, max_concurrent=1, max_queued=0), GREEDY)
    with server.start() as running:
        scheduler, name = server.app.state.runner._scheduler, running.model_name
        oa = openai.OpenAI(api_key="0", base_url=running.base_url, max_retries=0, timeout=60)
        ol = ollama.Client(host=running.url, timeout=60)
        quick = user(PROMPTS[0])
        long_body = {"model": name, "messages": LONG, "max_tokens": 400, "stream": True, "logit_bias": NO_EOS}
        with httpx.stream("POST", f"{running.base_url}/chat/completions", json=long_body, timeout=60) as busy:
            assert busy.status_code == 200
            lines = busy.iter_lines()
            next(line for line in lines if _sse_text(line))
            assert wait_until(lambda: scheduler.load == (1, 0), timeout=2.0)

            with pytest.raises(openai.RateLimitError) as refused:
                oa.chat.completions.create(model=name, messages=quick, max_tokens=4, temperature=0)
            assert refused.value.status_code == 429
            assert refused.value.response.headers["retry-after"] == "1"
            error = refused.value.body
            assert error["type"] == "rate_limit_exceeded" and error["code"] == "rate_limit_exceeded"
            assert error["message"].startswith("The server is busy") and error["param"] is None
            assert refused.value.response.json() == {"error": error}

            with pytest.raises(openai.RateLimitError):  # a stream is refused before its first event
                oa.chat.completions.create(model=name, messages=quick, max_tokens=4, stream=True)
            with pytest.raises(openai.RateLimitError):
                oa.completions.create(model=name, prompt="Hi", max_tokens=4)

            with pytest.raises(ollama.ResponseError) as busy_ollama:
                ol.chat(model=name, messages=quick, options={"num_predict": 4}, stream=False)
            assert busy_ollama.value.status_code == 503
            raw = httpx.post(f"{running.url}/api/chat", json={"model": name, "messages": quick}, timeout=60)
            assert raw.status_code == 503 and raw.headers["retry-after"] == "1"
            assert list(raw.json()) == ["error"] and raw.json()["error"].startswith("The server is busy")
            streamed = httpx.post(f"{running.url}/api/generate", json={"model": name, "prompt": "Hi"}, timeout=60)
            assert streamed.status_code == 503 and list(streamed.json()) == ["error"]  # not a broken NDJSON stream
        assert wait_until(lambda: scheduler.load == (0, 0), timeout=5.0)

        again = oa.chat.completions.create(model=name, messages=quick, max_tokens=4, temperature=0)
        assert again.choices[0].message.content
        assert ol.chat(model=name, messages=quick, options={"temperature": 0, "num_predict": 4}, stream=False).done


@pytest.mark.slow
def test_a_client_that_leaves_the_queue_frees_its_place(bundled_model):
    """A streaming request still waiting in the queue whose client leaves must give its place back at once,
    not hold it until a running generation ends (its request is cancelled: it will never run)."""
    server = Server(bundled_model, ServeConfig(**LOCAL, max_concurrent=1, max_queued=1), GREEDY)
    with server.start() as running:
        scheduler, name = server.app.state.runner._scheduler, running.model_name
        url = f"{running.base_url}/chat/completions"
        long_body = {"model": name, "messages": LONG, "max_tokens": 400, "stream": True, "logit_bias": NO_EOS}
        queued_body = {"model": name, "messages": user(PROMPTS[0]), "max_tokens": 4, "stream": True}
        with httpx.Client(timeout=60) as a, a.stream("POST", url, json=long_body) as busy:
            lines = busy.iter_lines()  # held: dropping the iterator would close the connection
            next(line for line in lines if _sse_text(line))
            assert wait_until(lambda: scheduler.load == (1, 0), timeout=2.0)
            with httpx.Client(timeout=60) as b, b.stream("POST", url, json=queued_body) as queued:
                assert queued.status_code == 200
                waiting = queued.iter_lines()
                next(waiting)  # the role chunk: it is in the queue, behind the long reply
                assert scheduler.load == (1, 1)
            time.sleep(0.5)  # the server has seen the client leave
            with httpx.Client(timeout=60) as c, c.stream("POST", url, json=queued_body) as next_one:
                status = next_one.status_code
            assert scheduler.load[0] == 1  # the long reply still runs
            assert status == 200  # the queue holds nobody who is still waiting: this one may wait there
            assert wait_until(lambda: scheduler.load[1] == 0, timeout=2.0), scheduler.load
