"""OpenAI wire format: the chat-completion request and the response objects.

Shapes follow ``openai/openai-openapi`` (``CreateChatCompletionRequest``/``Response``,
``CreateChatCompletionStreamResponse``, ``ListModelsResponse``); the ``ErrorResponse`` body is
:meth:`finetune_kit.errors.RequestError.body`. Request fields the server cannot honour are
rejected with a 400 naming the field rather than silently dropped; ``user`` is accepted and
ignored. ``seed``, the two penalties, ``logit_bias`` and ``response_format`` come from
:mod:`finetune_kit.serve.openai_sampling`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Literal

# imported only by serve/app.py, after Server has checked the serve extra (which brings pydantic)
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from finetune_kit.data.messages import Message, check_turns
from finetune_kit.errors import RequestError
from finetune_kit.models.engine import Completion
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.serve.openai_sampling import SamplingFields

MAX_STOP = 4
_ROLES = ("system", "developer", "user", "assistant")
GREEDY_BELOW = 1e-5
"""A temperature below this decodes greedily, as 0 does: logits divided by it overflow float32 (vLLM's rule)."""
INT64 = (-(2**63), 2**63 - 1)
_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins a valid pair into one character


def describe_validation_errors(errors: Any) -> RequestError:
    """One 400 listing every problem pydantic found in a request body; ``param`` is the first bad field."""
    problems, params = [], []
    for err in errors:
        loc = list(err.get("loc", ()))
        if loc and loc[0] == "body":
            loc = loc[1:]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
        kind, msg = err.get("type", ""), str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if kind == "json_invalid":
            param = None
            problems.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', msg)})")
        elif kind == "missing":
            problems.append(f"missing required parameter '{param}'" if param else "the request body is missing")
        elif param is None and kind == "value_error":  # a whole-body check of ours (UnicodeBody)
            problems.append(msg)
        elif param is None:
            problems.append(f"the request body must be a JSON object sent with Content-Type: application/json ({msg})")
        else:
            got = repr(err.get("input"))
            shown = kind != "value_error" and len(got) <= 80  # our own validators already quote the value
            problems.append(f"invalid value for '{param}': {msg}" + (f" (got {got})" if shown else ""))
        params.append(param)
    return RequestError("; ".join(problems) or "invalid request", param=next((p for p in params if p), None))


def lone_surrogate(value: Any, where: str = "") -> str | None:
    """Where in a parsed JSON body a string (or key) holds a lone UTF-16 surrogate, or None when none does."""
    if isinstance(value, str):
        return (where or "the body") if _SURROGATE.search(value) else None
    pairs = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in pairs:
        shown = key.encode("utf-8", "backslashreplace").decode() if isinstance(key, str) else key
        inner = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{shown}".lstrip(".")
        if (found := lone_surrogate(key, inner) or lone_surrogate(item, inner)) is not None:
            return found
    return None


class UnicodeBody(BaseModel):
    """A request body whose every string is Unicode text. JSON can spell a lone surrogate (``"\\ud800"``),
    but no tokenizer takes one and an answer quoting it cannot be encoded as UTF-8: a 400, not a 500."""

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        if (where := lone_surrogate(data)) is not None:
            raise ValueError(
                f"{where} holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair), which is not "
                "Unicode text. Fix: send the text as valid UTF-8"
            )
        return data


class ChatMessage(BaseModel):
    """One message; list-of-parts content is flattened to text (only ``text`` parts exist here)."""

    role: str
    content: str | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _flatten_parts(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError(f"content must be a string or a list of text parts; got {type(value).__name__}")
        texts = []
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(
                    f"content part {i} has type {kind!r}; this server reads only "
                    "{'type': 'text', 'text': '...'} parts (no images or audio)"
                )
            texts.append(part["text"])
        return "\n".join(texts)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(SamplingFields, UnicodeBody):
    """``POST /v1/chat/completions`` body; unknown fields are ignored like the OpenAI API does."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage]
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    do_sample: bool | None = None
    user: str | None = None  # accepted and ignored
    # rejected when used (see check_supported)
    tools: list[Any] | None = None
    logprobs: bool | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value) or len(value) > MAX_STOP:
            raise ValueError(f"stop must be a string or a list of up to {MAX_STOP} strings; got {value!r}")
        return [s for s in value if s]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        """Reject valid-looking requests this server cannot honour (raise :class:`RequestError`)."""
        if self.stream and self.n > 1:
            raise RequestError(f"n={self.n} cannot be streamed; send stream=false for several choices", param="n")
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed when stream is true", param="stream_options")
        if self.tools:
            raise RequestError("tools (function calling) are not supported by this server", param="tools")
        if self.logprobs:
            raise RequestError("logprobs are not supported by this server", param="logprobs")

    def conversation(self) -> list[Message]:
        """Messages as the chat template wants them: optional system, then user/assistant turns ending
        with a user turn (LLaMA-Factory's rule). Raises :class:`RequestError` naming the bad message."""
        if not self.messages:
            raise RequestError("messages must contain at least one user message", param="messages")
        out: list[Message] = []
        for i, msg in enumerate(self.messages):
            role = "system" if msg.role == "developer" else msg.role
            if role not in _ROLES:
                raise RequestError(
                    f"messages[{i}] has role {msg.role!r}; expected one of {', '.join(_ROLES)} "
                    "(tool and function messages are not supported)",
                    param=f"messages[{i}].role",
                )
            if msg.content is None:
                raise RequestError(f"messages[{i}] has no content", param=f"messages[{i}].content")
            out.append({"role": role, "content": msg.content})
        problem = check_turns([m["role"] for m in out])
        if problem is not None:
            i = problem.index
            raise RequestError(
                f"messages[{i}] has role {self.messages[i].role!r} but {problem.expected!r} was expected: after an "
                "optional first system message, roles must alternate user, assistant, user, ...",
                param=f"messages[{i}].role",
            )
        if out[-1]["role"] != "user":
            raise RequestError("the last message must have role 'user' (the server answers it)", param="messages")
        return out

    def generation(self, default: GenerationConfig) -> GenerationConfig:
        """The server's defaults overridden by this request (LF's rule: ``do_sample`` wins,
        temperature 0 or top_p 0 means greedy, ``max_completion_tokens`` beats ``max_tokens``)."""
        changes = sampling_changes(self.do_sample, self.temperature, self.top_p)
        limit = self.max_completion_tokens or self.max_tokens
        if limit is not None:
            changes["max_new_tokens"] = limit
        return default.with_(**changes) if changes else default


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, completions: Sequence[Completion]) -> Usage:
        """The usage of one request's choices: they share one prompt, counted once."""
        prompt = completions[0].prompt_tokens
        completion = sum(c.completion_tokens for c in completions)
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    """A stream delta; absent keys are left out (``{}`` on the last chunk), never sent as null."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _present_only(self) -> dict[str, str]:
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "finetune_kit"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----- Ollama native API (/api/*): request bodies ----------------------------------------------------
# Field names follow ollama/ollama api/types.go (GenerateRequest, ChatRequest, Message, ShowRequest,
# Options). Like Go's decoder, unknown fields are ignored; like Options.FromMap, unknown option names are.
class OllamaOptions(BaseModel):
    """The ``options`` map: what the server can honour; ``num_ctx`` is read and unused."""

    model_config = ConfigDict(extra="ignore")

    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    num_predict: int | None = None
    # within these bounds the logits it divides or multiplies stay finite in float32
    repeat_penalty: float | None = Field(None, ge=1e-5, le=1e5)
    stop: list[str] | None = None
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])  # Go's int, as Ollama reads it
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_ctx: int | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[Any] | None = None


class OllamaRequest(UnicodeBody):
    """What ``/api/chat`` and ``/api/generate`` share; ``stream`` absent or null means true."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    stream: bool | None = None
    format: str | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    keep_alive: float | str | None = None
    think: bool | str | None = None
    logprobs: bool | None = None


class OllamaChatRequest(OllamaRequest):
    messages: list[OllamaMessage] | None = None
    tools: list[Any] | None = None


class OllamaGenerateRequest(OllamaRequest):
    prompt: str = ""
    system: str = ""
    template: str = ""
    suffix: str = ""
    raw: bool = False
    context: list[int] | None = None
    images: list[str] | None = None


class OllamaShowRequest(UnicodeBody):
    """``/api/show``: ``model``, or ``name`` as older clients send it."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    name: str = ""
    verbose: bool = False


class OllamaEmbedRequest(UnicodeBody):
    """``/api/embed``: ``input`` a string or a list; ``truncate`` absent means true."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    input: str | list[str] | None = None
    truncate: bool | None = None
    dimensions: int | None = None
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None


class OllamaEmbeddingsRequest(UnicodeBody):
    """The legacy ``/api/embeddings``: one ``prompt``."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None


def sampling_changes(do_sample: bool | None, temperature: float | None, top_p: float | None) -> dict[str, Any]:
    """GenerationConfig changes for a request's sampling fields, the rule every route shares (LLaMA-Factory's):
    ``do_sample`` when given, then temperature 0 (or below :data:`GREEDY_BELOW`) or top_p 0 means greedy."""
    changes: dict[str, Any] = {}
    if do_sample is not None:
        changes["do_sample"] = do_sample
    if temperature is not None:
        changes["temperature"] = temperature
        if temperature < GREEDY_BELOW:
            changes["do_sample"] = False
    if top_p is not None:
        changes.update({"do_sample": False} if top_p == 0 else {"top_p": top_p})
    return changes


def stream_error_events(exc: BaseException) -> list[dict[str, str]]:
    """The SSE events that end an OpenAI stream after a failure: the error in OpenAI's shape, then ``[DONE]``
    (the status line went out already)."""
    if isinstance(exc, RequestError):  # already in OpenAI's shape (e.g. a reply that is not the JSON asked for)
        error = exc
    else:
        error = RequestError(f"generation failed: {type(exc).__name__}: {exc}", status=500, type="server_error")
    return [{"data": json.dumps(error.body())}, {"data": "[DONE]"}]
