"""Property: no request, shaped by the API's schema or malformed, makes the server answer 5xx.

Schemathesis draws requests from the served OpenAPI document (``/v1``) and from an OpenAPI
document built from the pydantic models the Ollama routes parse with (``/api``), in both modes:
bodies that fit the schema and bodies that break it. Hand-written strategies add what a schema
cannot reach: valid requests with fields swapped for garbage (so generation runs with odd
settings), and bodies that are no JSON object at all. Every answer is below 500 and every error
has its API's shape: ``{"error": {"message", "type", "param", "code"}}`` on ``/v1``,
``{"error": "..."}`` on ``/api``.

The server caps replies (``max_tokens_limit``) and answers in a few tokens by default, ``n`` is
capped before sending, and examples are derandomized, so a run is cheap and the same each time.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from pydantic.json_schema import models_json_schema
from schemathesis import GenerationMode

from finetune_kit.models.generation import GenerationConfig
from finetune_kit.serve import ServeConfig, Server
from finetune_kit.serve.openai_extra import CompletionRequest, EmbeddingRequest
from finetune_kit.serve.protocol import (
    ChatCompletionRequest,
    OllamaChatRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaMessage,
    OllamaOptions,
    OllamaShowRequest,
)

LOCAL = dict(api_host="127.0.0.1", api_port=0, api_key=None, api_model_name=None)
LIMIT = 2
"""The server's max_tokens_limit (and so its default reply length): a request asking for more gets a 400."""
EXAMPLES = 30
"""Examples per route and mode; each POST route gets 2 * EXAMPLES from the schema plus EXAMPLES mutated bodies."""
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure prints its whole request already
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
OPENAI_OPERATIONS = [
    ("POST", "/v1/chat/completions", GenerationMode.POSITIVE),
    ("POST", "/v1/chat/completions", GenerationMode.NEGATIVE),
    ("POST", "/v1/completions", GenerationMode.POSITIVE),
    ("POST", "/v1/completions", GenerationMode.NEGATIVE),
    ("POST", "/v1/embeddings", GenerationMode.POSITIVE),
    ("POST", "/v1/embeddings", GenerationMode.NEGATIVE),
    ("GET", "/v1/models/{model_id}", GenerationMode.POSITIVE),  # a path string has no negative
]
OLLAMA_POSTS = {
    "/api/chat": OllamaChatRequest,
    "/api/generate": OllamaGenerateRequest,
    "/api/embed": OllamaEmbedRequest,
    "/api/embeddings": OllamaEmbeddingsRequest,
    "/api/show": OllamaShowRequest,
}
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
SCHEMATHESIS = schemathesis.Config.from_dict({"max-stream-events": 10_000})  # read every event of a stream
# The 500s the server gives on purpose: a reply that breaks the JSON the client asked for. Decoding is
# not constrained, and the random model's replies are not JSON.
JSON_NOT_MET = ('format "json" was asked for', "invalid_json_output")  # /api's message, /v1's code


@pytest.fixture(scope="module")
def handle(tiny_llama):
    # sampling by default (GenerationConfig's field defaults), so the sampling settings reach the sampler
    config = ServeConfig(**LOCAL, max_tokens_limit=LIMIT)
    with Server(tiny_llama, config, GenerationConfig(max_new_tokens=LIMIT)).start() as running:
        yield running


@pytest.fixture(scope="module")
def http(handle):
    with httpx.Client(base_url=handle.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def openai_schema(handle):
    return schemathesis.openapi.from_url(f"{handle.url}/openapi.json", config=SCHEMATHESIS)


@pytest.fixture(scope="module")
def ollama_schema():
    """OpenAPI for the Ollama routes (left out of /openapi.json) from the request models they parse with."""
    keys = [(model, "validation") for model in OLLAMA_POSTS.values()]
    refs, defs = models_json_schema(keys, ref_template="#/components/schemas/{model}")
    paths = {
        path: {
            "post": {
                "requestBody": {"required": True, "content": {"application/json": {"schema": refs[key]}}},
                "responses": {"200": {"description": "the answer"}},
            }
        }
        for path, key in zip(OLLAMA_POSTS, keys, strict=True)
    }
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "Ollama routes", "version": "1"},
        "paths": paths,
        "components": {"schemas": defs["$defs"]},
    }
    return schemathesis.openapi.from_dict(doc, config=SCHEMATHESIS)


HI = [{"role": "user", "content": "Hi"}]


# ----- what every answer must look like ------------------------------------------------------------------
def cheap(body: Any) -> Any:
    """``body`` asking for at most 2 choices of at most 2 prompts; the server's max_tokens_limit caps each reply."""
    if not isinstance(body, dict):
        return body
    body = {k: 2 if k in ("n", "best_of") and _is_number(v) and v > 2 else v for k, v in body.items()}
    if isinstance(body.get("prompt"), list):
        body["prompt"] = body["prompt"][:2]
    return body


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def header(response: Any, name: str) -> str:
    value = response.headers.get(name, "")  # schemathesis' Response holds a list per header
    return value[0] if isinstance(value, list) else value


def note_status(status: int) -> None:
    if currently_in_test_context():  # --hypothesis-show-statistics tells how many got past validation
        event(f"status {status}")


def check_openai(response: Any, what: str) -> None:
    status, text = response.status_code, response.text
    note_status(status)
    shown = f"{what} -> {status}: {text[:2000]}"
    if status >= 400:
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"}, shown
        assert isinstance(error["message"], str) and error["message"], shown
        assert status < 500 or error["code"] == JSON_NOT_MET[1], shown
    elif header(response, "content-type").startswith("text/event-stream"):
        events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", shown
        for chunk in map(json.loads, events[:-1]):  # an error event: the stream failed after its 200
            assert "error" not in chunk or chunk["error"]["code"] == JSON_NOT_MET[1], f"{what} -> {chunk}"
    else:
        json.loads(text)


def check_ollama(response: Any, what: str) -> None:
    status, text = response.status_code, response.text
    note_status(status)
    shown = f"{what} -> {status}: {text[:2000]}"
    if status >= 400:
        body = json.loads(text)
        assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"], shown
        assert status < 500 or JSON_NOT_MET[0] in body["error"], shown
        return
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert lines, shown
    assert all("error" not in line for line in lines[:-1]), shown
    assert "error" not in lines[-1] or JSON_NOT_MET[0] in lines[-1]["error"], shown  # a stream that failed


def check(path: str, response: Any, what: str) -> None:
    (check_openai if path.startswith("/v1/") else check_ollama)(response, what)


def sent(case: Any) -> str:
    return f"{case.method} {case.formatted_path} {json.dumps(case.body, default=repr)[:1500]}"


# ----- requests drawn from the schemas -------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path", "mode"), OPENAI_OPERATIONS, ids=lambda v: str(v))
@FUZZ
@given(data=st.data())
def test_openai_routes_answer_schema_shaped_requests_below_500(handle, openai_schema, method, path, mode, data):
    case = data.draw(openai_schema[path][method].as_strategy(generation_mode=mode))
    case.body = cheap(case.body)
    check_openai(case.call(base_url=handle.url, timeout=60), sent(case))


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("path", list(OLLAMA_POSTS))
@FUZZ
@given(data=st.data())
def test_ollama_routes_answer_schema_shaped_requests_below_500(handle, ollama_schema, path, mode, data):
    case = data.draw(ollama_schema[path]["POST"].as_strategy(generation_mode=mode))
    case.body = cheap(case.body)
    if isinstance(case.body, dict) and data.draw(st.booleans()):
        case.body["model"] = handle.model_name  # past the model check, so the rest of the body is read
    check_ollama(case.call(base_url=handle.url, timeout=60), sent(case))


# ----- valid requests with garbage in them ---------------------------------------------------------------
EDGES = [0, -1, 1, 2, 2**31, 2**63, 2**64, -(2**63), 10**100, 5e-324, 1e-300, 1e300, -0.0, 0.5, 2.0000001]
EDGES += [float("inf"), float("-inf"), float("nan"), "", " ", "\x00", "\ud800", "a\udfffb", "json", "user"]
EDGES += ["assistant", "system", "text", "json_object", "0", "-1", "5m", "1e999", "\U0001f642" * 50, "²"]
leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40) | st.sampled_from(EDGES)
garbage = st.recursive(
    leaves,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=8,
)
VALID = {
    "/v1/chat/completions": {"messages": HI, "max_tokens": 2},
    "/v1/completions": {"prompt": "Hello", "max_tokens": 2},
    "/v1/embeddings": {"input": "Hello"},
    "/api/chat": {"messages": HI, "stream": False, "options": {"num_predict": 2}},
    "/api/generate": {"prompt": "Hi", "stream": False, "options": {"num_predict": 2}},
    "/api/embed": {"input": "Hi"},
    "/api/embeddings": {"prompt": "Hi"},
    "/api/show": {},
}
OPTIONS = [f"options.{name}" for name in OllamaOptions.model_fields]
FIELDS = {  # every field the server reads, nested ones as dotted paths
    "/v1/chat/completions": [
        *ChatCompletionRequest.model_fields,
        *("messages.0.role", "messages.0.content", "messages.0.name", "messages.1", "stream_options.include_usage"),
        *("response_format.type", "logit_bias.1", "logit_bias.²"),
    ],
    "/v1/completions": [*CompletionRequest.model_fields, "stream_options.include_usage", "logit_bias.1"],
    "/v1/embeddings": list(EmbeddingRequest.model_fields),
    "/api/chat": [*OllamaChatRequest.model_fields, *OPTIONS, *(f"messages.0.{k}" for k in OllamaMessage.model_fields)],
    "/api/generate": [*OllamaGenerateRequest.model_fields, *OPTIONS],
    "/api/embed": list(OllamaEmbedRequest.model_fields),
    "/api/embeddings": list(OllamaEmbeddingsRequest.model_fields),
    "/api/show": list(OllamaShowRequest.model_fields),
}


def put(body: Any, dotted: str, value: Any) -> None:
    """Set ``body[a][b]...`` for a dotted path "a.b...", replacing what is on the way by containers."""
    *parents, last = dotted.split(".")
    for key in parents:
        if isinstance(body, list) and key.isdigit() and int(key) < len(body):
            index: Any = int(key)
        elif isinstance(body, dict):
            index = key
        else:
            return
        body[index] = dict(body[index]) if isinstance(body, list) or isinstance(body.get(index), dict) else {}
        body = body[index]
    if isinstance(body, dict):
        body[last] = value
    elif isinstance(body, list) and last.isdigit():
        body.append(value)


@st.composite
def mutated(draw: Any, path: str, model: str) -> dict[str, Any]:
    """A valid body for ``path`` with one to three fields (known, nested or unknown) set to garbage."""
    body = json.loads(json.dumps(VALID[path]))
    body["model"] = model
    names = st.sampled_from(FIELDS[path]) | st.text(min_size=1, max_size=12)
    for _ in range(draw(st.integers(1, 3))):
        put(body, draw(names), draw(garbage))
    return body


@pytest.mark.parametrize("path", list(VALID))
@FUZZ
@given(data=st.data())
def test_valid_requests_with_garbage_fields_answer_below_500(handle, http, path, data):
    body = cheap(data.draw(mutated(path, handle.model_name)))
    content = json.dumps(body)  # NaN and Infinity as Python writes them, which the server's parser reads
    response = http.post(path, content=content, headers={"content-type": "application/json"})
    check(path, response, f"POST {path} {content[:1500]}")


# ----- bodies that are no JSON object ---------------------------------------------------------------------
not_objects = (
    st.binary(max_size=200)
    | st.text(max_size=200).map(str.encode)
    | garbage.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode())
    | st.sampled_from([b"", b" ", b"{", b'{"model": ', b"null", b"[]", b'{"a":1}{"b":2}', b"\xff\xfe{}", b"{}" * 3])
)
content_types = st.sampled_from(
    [None, "application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
    + ["application/json; charset=latin-1", "application/x-ndjson", "*/*"]
)


@FUZZ
@given(path=st.sampled_from(list(VALID)), raw=not_objects, kind=content_types)
def test_bodies_that_are_no_json_object_answer_400(handle, http, path, raw, kind):
    response = http.post(path, content=raw, headers={"content-type": kind} if kind else {})
    what = f"POST {path} {raw[:300]!r} ({kind})"
    assert 400 <= response.status_code < 500, f"{what} -> {response.status_code}: {response.text[:1000]}"
    check(path, response, what)


# ----- what the fuzzing found ----------------------------------------------------------------------------
FOUND = [
    # a temperature so small that logits / temperature overflow: now greedy, as temperature 0 is
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 2, "temperature": 1e-300}, 200),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 2, "temperature": 5e-324, "do_sample": True}, 200),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "temperature": 1e-300}, 200),
    ("/api/chat", {"messages": HI, "stream": False, "options": {"num_predict": 2, "temperature": 1e-300}}, 200),
    # a repeat_penalty whose division overflows, or an out-of-range seed: a 400 naming the option
    ("/api/generate", {"prompt": "Hi", "stream": False, "options": {"repeat_penalty": 1e-300}}, 400),
    ("/api/chat", {"messages": HI, "stream": False, "options": {"seed": 2**70}}, 400),
    ("/v1/chat/completions", {"messages": HI, "seed": 2**70, "temperature": 1}, 400),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "seed": 2**64 - 1, "n": 2, "temperature": 1}, 400),
    # keep_alive infinite (Infinity or 1e999 in JSON) or NaN
    ("/api/chat", {"messages": HI, "stream": False, "keep_alive": float("inf")}, 400),
    ("/api/embeddings", {"prompt": "Hi", "keep_alive": float("nan")}, 400),
    # a lone surrogate, which no tokenizer takes and no UTF-8 answer can quote
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi\ud800"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}, 400),
    ("/api/chat", {"messages": [{"role": "user", "content": "Hi\ud800"}], "stream": False}, 400),
    ("/api/generate", {"prompt": "Hi", "system": "\ud800", "stream": False}, 400),
    ("/api/embed", {"input": ["Hi", "\ud800"]}, 400),
    ("/api/embeddings", {"prompt": "Hi\ud800"}, 400),
    ("/api/show", {"model": "\ud800"}, 400),
    # a logit_bias key of non-ASCII digits ("²".isdigit() is true), a lone surrogate in raw text
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 2, "logit_bias": {"²": 1}}, 400),
    ("/v1/completions", {"prompt": "Hi\ud800", "max_tokens": 2}, 400),
    ("/v1/embeddings", {"input": "Hi\ud800"}, 400),
    ("/api/chat", {"messages": HI, "stream": False, "keep_alive": "5\ud800m"}, 400),
]


@pytest.mark.parametrize(("path", "body", "status"), FOUND)
def test_what_the_fuzzing_found_is_answered_below_500(handle, http, path, body, status):
    body = {"model": handle.model_name, **body}
    response = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    check(path, response, f"POST {path} {body}")
    assert response.status_code == status, response.text
