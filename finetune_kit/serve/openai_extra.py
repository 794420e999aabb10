"""OpenAI's raw-text completions and embeddings: ``POST /v1/completions`` and ``POST /v1/embeddings``.

Shapes follow ``openai/openai-openapi`` (``CreateCompletionRequest``/``Response``,
``CreateEmbeddingRequest``/``Response``). A completion prompt is raw text: the chat template is
not applied and the model continues the text's tokens (:class:`TextCompletionEngine`). An
embedding is the mean of the served model's last hidden state over the text's tokens,
L2-normalized (:class:`EmbeddingEngine`). Both go through the app's
:class:`~finetune_kit.serve.runner.Runner`, as chat does; Ollama's ``/api/embed`` lives in
:mod:`finetune_kit.serve.ollama_embed`.

Refused with a 400 naming the field, never dropped: ``suffix``, ``logprobs``, ``best_of`` other
than ``n``, token-id prompts and inputs, and ``dimensions`` other than the model's own (its
embeddings cannot be shortened). ``seed``, the penalties, ``logit_bias`` and ``response_format``
mean what they mean on ``/v1/chat/completions``.
"""

from __future__ import annotations

import base64
import json
import logging
import struct
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from contextlib import aclosing
from typing import Any, Literal

# imported only by serve/app.py, after Server has checked the serve extra
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import ConfigDict, Field, field_validator
from sse_starlette import EventSourceResponse

from finetune_kit.errors import RequestError
from finetune_kit.models.engine import Completion, EmbeddingEngine, Engine, TextCompletionEngine
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.serve.config import ServeConfig
from finetune_kit.serve.limits import check_max_tokens
from finetune_kit.serve.openai_sampling import SamplingFields, check_json
from finetune_kit.serve.protocol import MAX_STOP, StreamOptions, UnicodeBody, sampling_changes, stream_error_events
from finetune_kit.serve.runner import Job, Runner

logger = logging.getLogger("finetune_kit.serve")
DEFAULT_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` for ``/v1/completions``."""


def _texts(value: Any, field: str) -> Any:
    """A string or a non-empty list of strings, as a list; token ids get their own message."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, list) and value and all(isinstance(v, (int, list)) for v in value):
        raise ValueError(f"token-id {field}s are not accepted by this server; send the text as a string")
    raise ValueError(f"{field} must be a string or a non-empty list of strings")


class CompletionRequest(SamplingFields, UnicodeBody):
    """``POST /v1/completions`` body; unknown fields are ignored like the OpenAI API does."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: list[str]
    max_tokens: int | None = Field(DEFAULT_MAX_TOKENS, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stop: list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    do_sample: bool | None = None
    user: str | None = None  # accepted and ignored
    # rejected when used (see check_supported)
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value: Any) -> Any:
        return _texts(value, "prompt")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        value = [value] if isinstance(value, str) else value
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value) or len(value) > MAX_STOP:
            raise ValueError(f"stop must be a string or a list of up to {MAX_STOP} strings; got {value!r}")
        return [s for s in value if s]

    def check_supported(self) -> None:
        """Reject valid-looking requests this server cannot honour (raise :class:`RequestError`)."""
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed when stream is true", param="stream_options")
        if self.suffix:
            raise RequestError(
                "suffix (insert mode) is not supported: the served model has no fill-in-the-middle format. "
                "Fix: leave suffix out and send the text before the gap as prompt",
                param="suffix",
            )
        if self.logprobs is not None:
            raise RequestError("logprobs are not supported by this server; leave logprobs out", param="logprobs")
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError(
                f"best_of={self.best_of} is not supported (ranking candidates needs log probabilities); "
                f"leave best_of out or set it to n ({self.n})",
                param="best_of",
            )

    def generation(self, default: GenerationConfig) -> GenerationConfig:
        """The server's defaults overridden as on ``/v1/chat/completions``; ``max_tokens`` is 16 unless given."""
        changes = sampling_changes(self.do_sample, self.temperature, self.top_p)
        return default.with_(max_new_tokens=self.max_tokens or DEFAULT_MAX_TOKENS, **changes)


class EmbeddingRequest(UnicodeBody):
    """``POST /v1/embeddings`` body."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: list[str]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _inputs(cls, value: Any) -> Any:
        return _texts(value, "input")


def install_openai_extra_routes(
    router: APIRouter, *, runner: Runner, vocab: int | None, generation: GenerationConfig, config: ServeConfig
) -> None:
    """Add ``/completions`` and ``/embeddings`` to the ``/v1`` router, over ``runner``'s engine."""
    engine = runner.engine
    completer = engine if isinstance(engine, TextCompletionEngine) else None
    embedder = engine if isinstance(engine, EmbeddingEngine) else None
    context = engine.context_length

    @router.post("/completions")
    async def completions(body: CompletionRequest) -> Any:
        started = time.perf_counter()
        body.check_supported()
        if completer is None:
            raise _unsupported(engine, "continue raw text", "send the conversation to /v1/chat/completions")
        adapter = runner.adapter_for(body.model)
        asked = "max_tokens" if "max_tokens" in body.model_fields_set and body.max_tokens else None
        gen = check_max_tokens(body.generation(generation), config, asked)
        extras = body.extras(vocab)
        runner.check_extras(extras)
        json_mode = body.json_mode(" ".join(body.prompt))
        ids = [completer.encode_text(text) for text in body.prompt]
        counts = [len(p) for p in ids]
        for i, count in enumerate(counts):
            where = "prompt" if len(counts) == 1 else f"prompt[{i}]"
            if count == 0:
                raise RequestError(
                    f"{where} has no tokens (this tokenizer adds no BOS token to an empty text); send some text",
                    param="prompt",
                )
            if context and count + gen.max_new_tokens > context:
                raise RequestError(
                    f"This model's maximum context length is {context} tokens, however you requested "
                    f"{count + gen.max_new_tokens} tokens ({count} in {where}; {gen.max_new_tokens} for the "
                    "completion). Shorten the prompt or lower max_tokens.",
                    param="prompt",
                    code="context_length_exceeded",
                )
        stop, rid, created = body.stop or [], f"cmpl-{uuid.uuid4().hex}", int(time.time())
        # choice i answers prompt i // n; a seeded request gives each of its n choices its own seed
        jobs = [
            Job(p, gen, stop, text=text, adapter=adapter, extras=extras.for_choice(k))
            for text, p in zip(body.prompt, ids, strict=True)
            for k in range(body.n)
        ]
        prompts = [job.text or "" for job in jobs]
        served = runner.served_name(adapter)
        head = {"id": rid, "object": "text_completion", "created": created, "model": served}

        def usage(done: Iterable[Completion]) -> dict[str, int]:
            new = sum(c.completion_tokens for c in done)
            return {"prompt_tokens": sum(counts), "completion_tokens": new, "total_tokens": sum(counts) + new}

        def log(status: str, tokens: dict[str, int] | None) -> None:
            if config.api_verbose:
                used = f"{tokens['prompt_tokens']}+{tokens['completion_tokens']} tokens" if tokens else "no usage"
                logger.info(
                    "completions model=%s prompts=%d n=%d stream=%s -> %s, %s, %.2fs",
                    *(body.model, len(counts), body.n, body.stream, status, used, time.perf_counter() - started),
                )

        if body.stream:
            streams = [runner.open(job) for job in jobs]  # all submitted now, generated side by side
            events = _stream_completions(streams, prompts, json_mode, body, head, usage, log)
            return EventSourceResponse(events, sep="\n")
        done = await runner.complete(jobs)
        if json_mode:
            check_json(done)
        echoed = prompts if body.echo else [""] * len(prompts)
        choices = [
            {"text": echoed[i] + c.text, "index": i, "logprobs": None, "finish_reason": c.finish_reason}
            for i, c in enumerate(done)
        ]
        log("200 " + ",".join(c.finish_reason for c in done), usage(done))
        return JSONResponse({**head, "choices": choices, "usage": usage(done)})

    @router.post("/embeddings")
    async def embeddings(body: EmbeddingRequest) -> Any:
        if embedder is None:
            raise _unsupported(engine, "embed text", "use an embedding model's server")
        size = embedder.embedding_size
        if body.dimensions is not None and body.dimensions != size:
            raise RequestError(
                f"dimensions={body.dimensions} is not supported: this model's embeddings have {size} dimensions "
                f"and cannot be shortened. Fix: leave dimensions out (or send {size})",
                param="dimensions",
            )
        counts = [len(embedder.encode_text(text)) for text in body.input]
        for i, count in enumerate(counts):
            where = "input" if len(counts) == 1 else f"input[{i}]"
            if count == 0:
                raise RequestError(f"{where} has no tokens; send some text", param="input")
            if context and count > context:
                raise RequestError(
                    f"This model's maximum context length is {context} tokens, however {where} takes {count} "
                    "tokens. Shorten or split the input.",
                    param="input",
                    code="context_length_exceeded",
                )
        vectors: list[list[float]] = await runner.call(lambda: embedder.embed(body.input))
        encode = _base64 if body.encoding_format == "base64" else (lambda v: v)
        data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
        total = sum(counts)
        if config.api_verbose:
            logger.info("embeddings model=%s inputs=%d -> 200, %d tokens", body.model, len(counts), total)
        usage = {"prompt_tokens": total, "total_tokens": total}
        return JSONResponse({"object": "list", "data": data, "model": runner.name, "usage": usage})


async def _stream_completions(
    streams: list[AsyncGenerator[str | Completion, None]],
    prompts: list[str],
    json_mode: bool,
    body: CompletionRequest,
    head: dict[str, Any],
    usage: Callable[[Iterable[Completion]], dict[str, int]],
    log: Callable[[str, dict[str, int] | None], None],
) -> AsyncIterator[dict[str, str]]:
    """SSE events: each choice's text pieces in turn (the prompt first when echoing), its finish chunk,
    then an optional usage chunk and ``[DONE]``. The choices are generated side by side; their
    events are sent one choice after another."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}

    def event(index: int, text: str, reason: str | None = None) -> dict[str, str]:
        choice = {"text": text, "index": index, "logprobs": None, "finish_reason": reason}
        return {"data": json.dumps({**head, "choices": [choice], **extra}, ensure_ascii=False)}

    finals: list[Completion] = []
    try:
        for i, stream in enumerate(streams):
            if body.echo:
                yield event(i, prompts[i])
            async with aclosing(stream):
                async for item in stream:
                    if isinstance(item, str):
                        if item:
                            yield event(i, item)
                        continue
                    if json_mode:
                        check_json([item])
                    yield event(i, "", item.finish_reason)
                    finals.append(item)
    except Exception as exc:  # the status line is sent already: an error event ends the stream
        if not isinstance(exc, RequestError):
            logger.exception("generation failed mid-stream", exc_info=exc)
        for event_ in stream_error_events(exc):
            yield event_
        log("error mid-stream", None)
        return
    finally:
        for stream in streams:  # a client that left cancels the choices not yet read
            await stream.aclose()
    if include_usage:
        yield {"data": json.dumps({**head, "choices": [], "usage": usage(finals)})}
    yield {"data": "[DONE]"}
    log("200 " + ",".join(c.finish_reason for c in finals), usage(finals))


def _unsupported(engine: Engine, what: str, fix: str) -> RequestError:
    return RequestError(f"This server's engine ({type(engine).__name__}) cannot {what}; {fix}.", param="model")


def _base64(vector: list[float]) -> str:
    """Little-endian float32 bytes, base64-encoded: what ``encoding_format="base64"`` asks for."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
