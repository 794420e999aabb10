"""The FastAPI app: OpenAI-compatible routes over one :class:`~finetune_kit.models.engine.Engine`.

Generation never runs on the event loop: every route hands its work to the app's
:class:`~finetune_kit.serve.runner.Runner` (one continuous batch for a :class:`LoadedModel`,
worker threads for another engine), which refuses work beyond ``max_queued`` waiting requests
with a 429 here and a 503 on the Ollama routes. Bodies above ``max_request_bytes`` get a 413.

This module needs the ``serve`` extra; :class:`~finetune_kit.serve.server.Server` checks that
it is installed (raising :class:`~finetune_kit.errors.MissingDependencyError` with the pip
command) before importing it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

# This module is the serve extra's code, imported only by Server once the extra is checked, and
# FastAPI resolves route annotations (Request, ChatCompletionRequest) from module globals.
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from finetune_kit.errors import RequestError, TemplateError
from finetune_kit.models.engine import Completion, Engine, Overloaded
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.serve.config import ServeConfig
from finetune_kit.serve.limits import BodyLimit, check_max_tokens, key_check, overloaded_response
from finetune_kit.serve.ollama_api import install_ollama_routes
from finetune_kit.serve.openai_extra import install_openai_extra_routes
from finetune_kit.serve.openai_sampling import check_json
from finetune_kit.serve.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ModelCard,
    ModelList,
    Usage,
    describe_validation_errors,
    stream_error_events,
)
from finetune_kit.serve.runner import Job, Runner
from finetune_kit.serve.webchat import install_webchat_routes

logger = logging.getLogger("finetune_kit.serve")


def create_app(engine: Engine, config: ServeConfig, generation: GenerationConfig) -> FastAPI:
    """Build the app serving ``engine`` under one model id, with ``generation`` as request defaults."""
    runner = Runner(engine, config)
    name = runner.name
    created = int(time.time())
    cards = [ModelCard(id=n, created=created) for n in runner.names]
    context = engine.context_length
    vocab = _vocab_size(engine)

    app = FastAPI(title="finetune_kit OpenAI-compatible API", version="1")
    app.add_middleware(
        CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"], allow_headers=["*"]
    )
    app.add_middleware(BodyLimit, limit=config.max_request_bytes)
    _install_error_handlers(app)
    app.state.runner = runner
    router = APIRouter(prefix="/v1", dependencies=[Depends(_bearer_check(config.api_key))] if config.api_key else [])

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "model": name})

    @router.get("/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(ModelList(data=cards).model_dump())

    @router.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        for card in cards:
            if card.id == model_id:
                return JSONResponse(card.model_dump())
        served = ", ".join(repr(c.id) for c in cards)
        raise RequestError(
            f"The model '{model_id}' does not exist; this server serves {served}.",
            param="model",
            status=404,
            code="model_not_found",
        )

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        started = time.perf_counter()
        body.check_supported()
        messages = body.conversation()
        adapter = runner.adapter_for(body.model)
        asked = "max_completion_tokens" if body.max_completion_tokens else "max_tokens" if body.max_tokens else None
        gen = check_max_tokens(body.generation(generation), config, asked)
        extras = body.extras(vocab)
        runner.check_extras(extras)
        json_mode = body.json_mode(" ".join(m["content"] for m in messages))
        try:
            prompt = engine.encode_prompt(messages)
        except TemplateError as exc:
            raise RequestError(str(exc), param="messages") from exc
        if context and len(prompt) >= context:
            raise RequestError(
                f"This model's maximum context length is {context} tokens, but the messages "
                f"take {len(prompt)} tokens. Shorten the conversation.",
                param="messages",
                code="context_length_exceeded",
            )
        stop = body.stop or []
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        job = Job(prompt, gen, stop, messages=messages, extras=extras, adapter=adapter)
        served = runner.served_name(adapter)

        def log(status: str, usage: Usage | None) -> None:
            if config.api_verbose:
                tokens = f"{usage.prompt_tokens}+{usage.completion_tokens} tokens" if usage else "no usage"
                logger.info(
                    "chat.completions model=%s messages=%d n=%d stream=%s -> %s, %s, %.2fs",
                    body.model,
                    len(messages),
                    body.n,
                    body.stream,
                    status,
                    tokens,
                    time.perf_counter() - started,
                )

        if body.stream:
            items = runner.open(job)  # submitted now: an overloaded server answers 429, not a broken stream
            events = _stream(
                items,
                body.include_usage,
                json_mode,
                ChatCompletionChunk(id=rid, created=created, model=served, choices=[]),
                log,
            )
            return EventSourceResponse(events, sep="\n")

        done = await runner.complete([dataclasses.replace(job, extras=job.extras.for_choice(i)) for i in range(body.n)])
        if json_mode:
            check_json(done)
        usage = Usage.of(done)
        choices = [
            Choice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
            for i, c in enumerate(done)
        ]
        log("200 " + ",".join(c.finish_reason for c in done), usage)
        return JSONResponse(
            ChatCompletion(id=rid, created=created, model=served, choices=choices, usage=usage).model_dump()
        )

    install_openai_extra_routes(router, runner=runner, vocab=vocab, generation=generation, config=config)
    install_ollama_routes(app, runner=runner, generation=generation, config=config)
    install_webchat_routes(app)
    app.include_router(router)
    return app


async def _stream(
    items: AsyncGenerator[str | Completion, None],
    include_usage: bool,
    json_mode: bool,
    base: ChatCompletionChunk,
    log: Callable[[str, Usage | None], None],
) -> AsyncIterator[dict[str, str]]:
    """SSE events: role chunk, content chunks, finish chunk, optional usage chunk, ``[DONE]``; an error
    after the first event is sent as an ``error`` event, then the stream ends."""
    skip = None if include_usage else {"usage"}

    def event(choice: ChunkChoice | None, usage: Usage | None = None) -> dict[str, str]:
        chunk = base.model_copy(update={"choices": [choice] if choice else [], "usage": usage})
        return {"data": chunk.model_dump_json(exclude=skip)}

    final = None
    try:
        yield event(ChunkChoice(delta=Delta(role="assistant", content="")))
        async with aclosing(items):
            async for item in items:
                if isinstance(item, str):
                    yield event(ChunkChoice(delta=Delta(content=item)))
                else:
                    final = item
        assert final is not None
        if json_mode:
            check_json([final])
    except Exception as exc:
        if not isinstance(exc, RequestError):
            logger.exception("generation failed mid-stream", exc_info=exc)
        for event_ in stream_error_events(exc):
            yield event_
        log("error mid-stream", None)
        return
    yield event(ChunkChoice(delta=Delta(), finish_reason=final.finish_reason))
    usage = Usage.of([final])
    if include_usage:
        yield event(None, usage)
    yield {"data": "[DONE]"}
    log(f"200 {final.finish_reason}", usage)


def _vocab_size(engine: Engine) -> int | None:
    size = getattr(getattr(getattr(engine, "model", None), "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def _bearer_check(key: str) -> Callable[[Request], Any]:
    check = key_check(key, lambda: RequestError("Invalid API key.", status=401, code="invalid_api_key"))

    async def dependency(request: Request) -> None:
        check(request)

    return dependency


def _error_response(error: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    async def request_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestError)
        if exc.status == 400:
            logger.info("400 %s %s: %s", request.method, request.url.path, exc)
        return _error_response(exc)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return await request_error(request, describe_validation_errors(exc.errors()))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed for {request.url.path}"
        else:
            message = str(exc.detail)
        return _error_response(
            RequestError(
                message,
                status=exc.status_code,
                type="invalid_request_error" if exc.status_code < 500 else "server_error",
            )
        )

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("500 %s %s", request.method, request.url.path, exc_info=exc)
        return _error_response(
            RequestError(
                f"The server failed to generate a reply: {type(exc).__name__}: {exc}", status=500, type="server_error"
            )
        )

    async def overloaded(request: Request, exc: Exception) -> JSONResponse:
        return overloaded_response(request.url.path, exc)

    app.add_exception_handler(Overloaded, overloaded)
    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
