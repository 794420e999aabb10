"""Ollama's native API (``/api/chat``, ``/api/generate``, ``/api/tags``, ...) over the served engine.

Clients written for Ollama (the ``ollama`` Python and JS libraries, open-webui) work against a
:class:`~finetune_kit.serve.server.Server` unchanged, pointed at its root URL. Generation shares
the OpenAI routes' :class:`~finetune_kit.serve.runner.Runner` (one batch, one queue), so
``max_concurrent`` and ``max_queued`` bound both APIs together (a full queue is a 503 here), and ``api_key``
protects ``/api/*`` as it protects ``/v1``. Shapes, defaults and error texts follow Ollama's
``server/routes.go`` and ``api/types.go``: NDJSON streaming unless ``stream`` is false, a last
object with ``done: true``, ``done_reason`` and nanosecond durations, and every error as
``{"error": "..."}``.

What the engine cannot do is refused with a 400 saying so, never dropped: ``raw`` prompts (the
engine always applies its chat template), ``suffix``, a Go ``template``, ``context``, images,
tools, ``think: true``, ``logprobs`` and a JSON-schema ``format``. ``format: "json"`` is checked,
not enforced: a reply that is not JSON ends with an error. ``keep_alive`` is read and has no
effect, since the server holds its one model for its whole life (an unload request is answered
as Ollama answers it, and ``/api/ps`` keeps listing the model). ``options.seed`` and the two
penalties mean what they mean on the OpenAI routes.
"""

import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

from finetune_kit.data.messages import Message
from finetune_kit.errors import RequestError, TemplateError
from finetune_kit.models.engine import Completion, Overloaded
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.serve import ollama_wire as wire
from finetune_kit.serve import webchat
from finetune_kit.serve.config import ServeConfig
from finetune_kit.serve.limits import key_check, overloaded_response
from finetune_kit.serve.ollama_embed import install_ollama_embed_routes
from finetune_kit.serve.runner import Job, Runner

if TYPE_CHECKING:
    from finetune_kit.serve.protocol import OllamaRequest

OLLAMA_VERSION = "0.9.0"
"""What ``/api/version`` reports: the first Ollama whose API has every request field served here
(``think`` came in 0.9.0), so clients that check a version before sending a field find it."""

logger = logging.getLogger("finetune_kit.serve")
Kind = Literal["chat", "generate"]
_PATHS = (
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/api/tags",
    "/api/ps",
    "/api/show",
    "/api/version",
)


def install_ollama_routes(app: Any, *, runner: Runner, generation: GenerationConfig, config: ServeConfig) -> None:
    """Add Ollama's routes to ``app`` (a FastAPI app), serving each of ``runner.names`` as ``<name>:latest``."""
    # no `from __future__ import annotations` here: FastAPI reads `request: Request` below as a real class
    from fastapi import Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from pydantic import ValidationError

    from finetune_kit.serve import protocol

    engine = runner.engine
    described = {n: wire.describe_model(engine, n) for n in runner.names}
    check_key = key_check(
        config.api_key,
        lambda: RequestError("unauthorized: send the server's API key as 'Authorization: Bearer <key>'", status=401),
    )

    def error(exc: RequestError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    Handler = Callable[[Request], Awaitable[Response]]

    def route(path: str, methods: list[str]) -> Callable[[Handler], Handler]:
        def add(handler: Handler) -> Handler:
            async def endpoint(request: Request) -> Response:
                try:
                    check_key(request)
                    return await handler(request)
                except Overloaded as exc:
                    return overloaded_response(request.url.path, exc)
                except RequestError as exc:
                    if exc.status < 500:
                        logger.info("%d %s %s: %s", exc.status, request.method, request.url.path, exc.message)
                    return error(exc)
                except Exception as exc:
                    logger.exception("500 %s %s", request.method, request.url.path)
                    return error(RequestError(f"{type(exc).__name__}: {exc}", status=500))

            app.add_api_route(path, endpoint, methods=methods, include_in_schema=False)
            return handler

        return add

    async def parse(request: Request, model: type[Any]) -> Any:
        raw = await request.body()
        if not raw.strip():
            raise RequestError("missing request body")
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise RequestError(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise RequestError(f"the request body must be a JSON object; got a JSON {type(data).__name__}")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise protocol.describe_validation_errors(exc.errors()) from None

    def find(requested: str) -> tuple[wire.ModelFacts, str | None]:
        """The served model a request names, and the adapter that gives it."""
        if not requested:
            raise RequestError("model is required")
        for served, facts in described.items():
            if requested.casefold() in facts.aliases:
                return facts, runner.adapter_for(served)
        raise RequestError(f"model '{requested}' not found", status=404)

    async def respond(
        kind: Kind, body: "OllamaRequest", messages: list[Message], started: int, adapter: str | None
    ) -> Response:
        json_wanted = wire.wants_json(body.format)
        try:
            prompt = engine.encode_prompt(messages)
        except TemplateError as exc:
            raise RequestError(str(exc)) from exc
        gen, stop = wire.generation_options(
            body.options, generation, len(prompt), engine.context_length, config.max_tokens_limit
        )
        extras = wire.sampling_extras(body.options)
        runner.check_extras(extras)
        clock = _Clock(started, began=time.perf_counter_ns())
        job = Job(prompt, gen, stop, messages=messages, extras=extras, adapter=adapter)
        pieces = _pieces(runner.open(job), clock)  # submitted now: a full queue answers 503 before any line
        out = _Objects(kind, body.model)

        def finish(final: Completion, text: str) -> dict[str, Any]:
            if json_wanted and (problem := wire.json_problem(text)):
                raise RequestError(problem, status=500)
            if config.api_verbose:
                logger.info(
                    "ollama /api/%s model=%s stream=%s -> %s, %d+%d tokens, %.2fs",
                    *(kind, body.model, body.stream is not False, final.finish_reason),
                    *(final.prompt_tokens, final.completion_tokens, (time.perf_counter_ns() - started) / 1e9),
                )
            return out.final(final, clock, text if body.stream is False else "")

        if body.stream is False:
            text, final = await _collect(pieces)
            return JSONResponse(finish(final, text))

        async def lines() -> AsyncIterator[str]:
            text, final = "", None
            try:
                async with aclosing(pieces):
                    async for item in pieces:
                        if isinstance(item, str):
                            text += item
                            yield _line(out.piece(item))
                        else:
                            final = item
                assert final is not None  # _pieces ends with a Completion or raises
                yield _line(finish(final, text))
            except Exception as exc:  # the status line is sent already: Ollama ends the stream with an error line
                message = exc.message if isinstance(exc, RequestError) else f"{type(exc).__name__}: {exc}"
                logger.info("ollama /api/%s stream ended with an error: %s", kind, message)
                yield _line({"error": message})

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @route("/api/chat", ["POST"])
    async def chat(request: Request) -> Response:
        started = time.perf_counter_ns()
        body = await parse(request, protocol.OllamaChatRequest)
        _, adapter = find(body.model)
        wire.refuse_unsupported(body)
        if body.tools:
            raise RequestError(f"{body.model} does not support tools")
        if not body.messages:  # Ollama loads (or unloads) the model and answers at once
            return JSONResponse(_Objects("chat", body.model).loaded(wire.unloads(body.keep_alive)))
        return await respond("chat", body, wire.conversation(body.messages), started, adapter)

    @route("/api/generate", ["POST"])
    async def generate(request: Request) -> Response:
        started = time.perf_counter_ns()
        body = await parse(request, protocol.OllamaGenerateRequest)
        _, adapter = find(body.model)
        wire.refuse_unsupported(body)
        if not body.prompt and not body.suffix:
            return JSONResponse(_Objects("generate", body.model).loaded(wire.unloads(body.keep_alive)))
        if body.raw:
            raise RequestError(
                "raw: this server cannot send a prompt without the chat template (its engine always applies "
                "the template). Fix: send raw=false, or send the conversation to /api/chat"
            )
        if body.suffix:
            raise RequestError(f'"{body.model}" does not support insert (suffix)')
        if body.template:
            raise RequestError("template: this server cannot run a Go template; leave it out to use the model's own")
        if body.context:
            raise RequestError("context: this server takes no token context back; send the conversation to /api/chat")
        if body.images:
            raise RequestError(f"images: {body.model} is a text-only model")
        system = [{"role": "system", "content": body.system}] if body.system else []
        messages = [*system, {"role": "user", "content": body.prompt}]
        return await respond("generate", body, messages, started, adapter)

    @route("/api/tags", ["GET", "HEAD"])
    async def tags(request: Request) -> Response:
        return JSONResponse({"models": [facts.listing() for facts in described.values()]})

    @route("/api/ps", ["GET"])
    async def ps(request: Request) -> Response:
        expires = wire.timestamp(datetime.now(timezone.utc) + wire.FOREVER)
        models = []
        for facts in described.values():
            model = {**facts.listing(), "expires_at": expires, "size_vram": facts.size if facts.on_gpu else 0}
            if engine.context_length:
                model["context_length"] = engine.context_length
            models.append(model)
        return JSONResponse({"models": models})

    @route("/api/show", ["POST"])
    async def show(request: Request) -> Response:
        body = await parse(request, protocol.OllamaShowRequest)
        facts, _ = find(body.model or body.name)
        return JSONResponse(facts.show(generation, engine.context_length))

    @route("/api/version", ["GET", "HEAD"])
    async def version(request: Request) -> Response:
        return JSONResponse({"version": OLLAMA_VERSION})

    install_ollama_embed_routes(route, parse, find, runner=runner)

    @route("/api/{rest:path}", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])
    async def unknown(request: Request) -> Response:
        path = request.url.path.rstrip("/")
        if path in _PATHS:
            raise RequestError(f"method {request.method} is not allowed for {path}", status=405)
        offered = ", ".join(_PATHS)
        raise RequestError(f"404 page not found: {path} is not served here (this server offers {offered})", status=404)

    async def running(request: Request) -> Response:
        # a browser asks for HTML and gets the chat page; Ollama clients probe without asking for it
        if request.method == "GET" and webchat.prefers_html(request.headers.get("accept")):
            return webchat.page_response()
        return PlainTextResponse("Ollama is running", headers={"Vary": "Accept"})

    app.add_api_route("/", running, methods=["GET", "HEAD"], include_in_schema=False)


@dataclass
class _Clock:
    """When a request arrived, got its slot, saw its first text piece and got its Completion (ns)."""

    arrived: int
    began: int = 0
    first: int = 0
    ended: int = 0


async def _pieces(
    items: AsyncGenerator[str | Completion, None], clock: _Clock
) -> AsyncGenerator[str | Completion, None]:
    """A submitted generation's text pieces, then its Completion, noting when the first piece and the end came."""
    try:
        async with aclosing(items):
            async for item in items:
                if isinstance(item, str):
                    if item:
                        clock.first = clock.first or time.perf_counter_ns()
                        yield item
                else:
                    clock.ended = time.perf_counter_ns()
                    yield item
    except RequestError:
        raise
    except Exception as exc:
        raise RequestError(f"generation failed: {type(exc).__name__}: {exc}", status=500) from exc


async def _collect(pieces: AsyncIterator[str | Completion]) -> tuple[str, Completion]:
    text, final = "", None
    async for item in pieces:
        if isinstance(item, str):
            text += item
        else:
            final = item
    assert final is not None
    return text, final


@dataclass(frozen=True)
class _Objects:
    """The JSON objects of one response: ``message`` for /api/chat, ``response`` for /api/generate."""

    kind: Kind
    model: str

    def _base(self, text: str, done: bool) -> dict[str, Any]:
        content = {"message": {"role": "assistant", "content": text}} if self.kind == "chat" else {"response": text}
        return {"model": self.model, "created_at": wire.timestamp(datetime.now(timezone.utc)), **content, "done": done}

    def piece(self, text: str) -> dict[str, Any]:
        return self._base(text, False)

    def loaded(self, unload: bool) -> dict[str, Any]:
        return {**self._base("", True), "done_reason": "unload" if unload else "load"}

    def final(self, done: Completion, clock: _Clock, text: str) -> dict[str, Any]:
        now = time.perf_counter_ns()
        first = clock.first or clock.ended
        metrics = {
            "total_duration": now - clock.arrived,
            "load_duration": clock.began - clock.arrived,  # parsing and waiting for a slot: our "load"
            "prompt_eval_count": done.prompt_tokens,
            "prompt_eval_duration": first - clock.began,  # until the first text piece
            "eval_count": done.completion_tokens,
            "eval_duration": clock.ended - first,
        }
        kept = {k: v for k, v in metrics.items() if v > 0}  # Go's omitempty
        return {**self._base(text, True), "done_reason": done.finish_reason, **kept}


def _line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"
