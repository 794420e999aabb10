"""The server's limits: the API key, request body size, reply length, and the answer when the queue is full."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable
from typing import Any

from finetune_kit.errors import RequestError
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.serve.config import ServeConfig

RETRY_AFTER_S = 1


def key_check(key: str | None, refuse: Callable[[], RequestError]) -> Callable[[Any], None]:
    """A check of ``Authorization: Bearer <key>`` compared in constant time; it raises ``refuse()`` on a
    missing or wrong key (no check without a ``key``). Both APIs use it, each with its own error."""
    if not key:
        return lambda request: None
    expected = hashlib.sha256(key.encode()).digest()

    def check(request: Any) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode()).digest()
        if scheme.lower() != "bearer" or not secrets.compare_digest(given, expected):
            raise refuse()

    return check


def is_ollama(path: str) -> bool:
    """Whether ``path`` is one of the Ollama routes, whose errors are ``{"error": "..."}``."""
    return path.startswith("/api/") or path == "/api"


def _error_body(path: str, error: RequestError) -> bytes:
    body = {"error": error.message} if is_ollama(path) else error.body()
    return json.dumps(body).encode()


def overloaded_response(path: str, exc: Exception) -> Any:
    """429 with OpenAI's ``rate_limit_exceeded`` on ``/v1``, 503 on Ollama's routes; both say when to retry."""
    from fastapi.responses import Response

    ollama = is_ollama(path)
    error = RequestError(
        f"The server is busy: {exc}",
        status=503 if ollama else 429,
        type="server_error" if ollama else "rate_limit_exceeded",
        code="rate_limit_exceeded",
    )
    return Response(
        _error_body(path, error),
        status_code=error.status,
        media_type="application/json",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def check_max_tokens(gen: GenerationConfig, config: ServeConfig, param: str | None) -> GenerationConfig:
    """``gen`` within ``max_tokens_limit``: a reply length the client asked for (in the field ``param``)
    above the limit is a 400 naming it; the server's default (``param`` None) is lowered to the limit."""
    limit = config.max_tokens_limit
    if limit is None or gen.max_new_tokens <= limit:
        return gen
    if param is None:
        return gen.with_(max_new_tokens=limit)
    if gen.max_new_tokens > limit:
        raise RequestError(
            f"{param} is {gen.max_new_tokens}, above this server's limit of {limit} tokens per reply. Fix: ask for "
            f"at most {limit} (the server's max_tokens_limit)",
            param=param,
            code="max_tokens_exceeded",
        )
    return gen


class BodyLimit:
    """ASGI middleware: a request body above ``limit`` bytes gets a 413 before the app sees any of it,
    whether it declares a ``Content-Length`` or arrives in chunks (it is read first, up to the limit,
    then handed on)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(path, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(path, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)

    async def _refuse(self, path: str, send: Any) -> None:
        error = RequestError(
            f"The request body is larger than this server's limit of {self.limit} bytes. Fix: send a shorter "
            "request, or raise max_request_bytes (MAX_REQUEST_BYTES) on the server",
            status=413,
            code="request_too_large",
        )
        body = _error_body(path, error)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
