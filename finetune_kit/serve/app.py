"""The FastAPI app: OpenAI-compatible routes over one :class:`~finetune_kit.models.engine.Engine`.

Generation never runs on the event loop: each request takes a slot of an asyncio semaphore
(``max_concurrent``, 1 like LLaMA-Factory, and never more than the engine's
``max_concurrency``) and runs in a worker thread. The slot is released when the worker thread
finishes, not when the client leaves, so an abandoned stream cannot let a second generation
overlap the first.

This module needs the ``serve`` extra; :class:`~finetune_kit.serve.server.Server` checks that
it is installed (raising :class:`~finetune_kit.errors.MissingDependencyError` with the pip
command) before importing it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
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
from finetune_kit.models.engine import Completion, Engine
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.serve.config import ServeConfig
from finetune_kit.serve.ollama_api import install_ollama_routes
from finetune_kit.serve.openai_extra import install_openai_extra_routes
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
from finetune_kit.serve.pump import in_slot
from finetune_kit.serve.webchat import install_webchat_routes

logger = logging.getLogger("finetune_kit.serve")


def concurrency(engine: Engine, config: ServeConfig) -> int:
    """Generations at once: ``max_concurrent``, capped by what the engine can run in parallel."""
    if engine.max_concurrency < 1:
        raise ValueError(
            f"{type(engine).__name__}.max_concurrency is {engine.max_concurrency}; an Engine must "
            "run at least one generation at a time"
        )
    return min(config.max_concurrent, engine.max_concurrency)


def create_app(engine: Engine, config: ServeConfig, generation: GenerationConfig) -> FastAPI:
    """Build the app serving ``engine`` under one model id, with ``generation`` as request defaults."""
    name = config.served_name(engine)
    card = ModelCard(id=name, created=int(time.time()))
    slots = _Slots(concurrency(engine, config))
    context = engine.context_length

    app = FastAPI(title="finetune_kit OpenAI-compatible API", version="1")
    app.add_middleware(
        CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"], allow_headers=["*"]
    )
    _install_error_handlers(app)
    router = APIRouter(prefix="/v1", dependencies=[Depends(_bearer_check(config.api_key))] if config.api_key else [])

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "model": name})

    @router.get("/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(ModelList(data=[card]).model_dump())

    @router.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        if model_id != name:
            raise RequestError(
                f"The model '{model_id}' does not exist; this server serves '{name}'.",
                param="model",
                status=404,
                code="model_not_found",
            )
        return JSONResponse(card.model_dump())

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        started = time.perf_counter()
        body.check_supported()
        messages = body.conversation()
        gen = body.generation(generation)
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
            events = _stream(
                engine,
                messages,
                gen,
                stop,
                slots,
                body.include_usage,
                ChatCompletionChunk(id=rid, created=created, model=name, choices=[]),
                log,
            )
            return EventSourceResponse(events, sep="\n")

        def work() -> list[Completion]:
            return engine.generate([messages] * body.n, gen, batch_size=min(body.n, 8), stop=stop)

        done = await slots.run(work)
        usage = Usage.of(done)
        choices = [
            Choice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
            for i, c in enumerate(done)
        ]
        log("200 " + ",".join(c.finish_reason for c in done), usage)
        return JSONResponse(
            ChatCompletion(id=rid, created=created, model=name, choices=choices, usage=usage).model_dump()
        )

    install_openai_extra_routes(router, engine=engine, name=name, slots=slots, generation=generation, config=config)
    install_ollama_routes(app, engine=engine, name=name, slots=slots, generation=generation, config=config)
    install_webchat_routes(app)
    app.include_router(router)
    return app


async def _stream(
    engine: Engine,
    messages: list[dict[str, str]],
    gen: GenerationConfig,
    stop: list[str],
    slots: _Slots,
    include_usage: bool,
    base: ChatCompletionChunk,
    log: Callable[[str, Usage | None], None],
) -> AsyncIterator[dict[str, str]]:
    """SSE events: role chunk, content chunks, finish chunk, optional usage chunk, ``[DONE]``."""
    skip = None if include_usage else {"usage"}

    def event(choice: ChunkChoice | None, usage: Usage | None = None) -> dict[str, str]:
        chunk = base.model_copy(update={"choices": [choice] if choice else [], "usage": usage})
        return {"data": chunk.model_dump_json(exclude=skip)}

    yield event(ChunkChoice(delta=Delta(role="assistant", content="")))

    def produce(abandoned: threading.Event) -> Iterator[str | Completion]:
        item: Any = None
        for item in engine.stream(messages, gen, stop=stop):  # runs to the end even if abandoned
            yield item
        if item is None or isinstance(item, str):
            raise TypeError(
                f"{type(engine).__name__}.stream() ended without a Completion; an Engine's "
                "stream yields text pieces, then one Completion"
            )

    sent, final = "", None
    try:
        async with aclosing(in_slot(slots, produce)) as items:
            async for item in items:
                if isinstance(item, str):
                    sent += item
                    yield event(ChunkChoice(delta=Delta(content=item)))
                else:
                    final = item
    except Exception as exc:
        logger.exception("generation failed mid-stream", exc_info=exc)
        for event_ in stream_error_events(exc):
            yield event_
        log("error mid-stream", None)
        return
    assert final is not None  # produce() raises rather than end without a Completion
    if len(final.text) > len(sent) and final.text.startswith(sent):  # text the streamer held back
        yield event(ChunkChoice(delta=Delta(content=final.text[len(sent) :])))
    yield event(ChunkChoice(delta=Delta(), finish_reason=final.finish_reason))
    usage = Usage.of([final])
    if include_usage:
        yield event(None, usage)
    yield {"data": "[DONE]"}
    log(f"200 {final.finish_reason}", usage)


class _Slots:
    """``max_concurrent`` generation slots; a slot frees when its worker thread ends.

    The semaphore is made on first use in the running loop, so one app can be served by
    several event loops one after another (``Server.start()`` twice).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sem: asyncio.Semaphore | None = None

    async def start(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        if self._sem is None or self._loop is not loop:
            self._loop, self._sem = loop, asyncio.Semaphore(self.size)
        sem = self._sem
        await sem.acquire()
        try:
            future = loop.run_in_executor(None, fn)
        except BaseException:
            sem.release()
            raise
        future.add_done_callback(lambda _: sem.release())
        return future

    async def run(self, fn: Callable[[], Any]) -> Any:
        # shield: a cancelled request must not mark the future done while its thread still runs
        return await asyncio.shield(await self.start(fn))


def _bearer_check(key: str) -> Callable[[Request], Any]:
    expected = hashlib.sha256(key.encode()).digest()

    async def check(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode()).digest()
        if scheme.lower() != "bearer" or not secrets.compare_digest(given, expected):
            raise RequestError("Invalid API key.", status=401, code="invalid_api_key")

    return check


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

    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
