"""Ollama's ``/api/embed`` and legacy ``/api/embeddings`` over the served engine.

Behaviour follows Ollama's ``server/routes.go`` (``EmbedHandler``, ``EmbeddingsHandler``):
``/api/embed`` takes a string or a list, returns L2-normalized vectors with nanosecond durations
and ``prompt_eval_count``, truncates an input longer than the context unless ``truncate`` is false,
and answers an empty input with no embeddings; ``/api/embeddings`` takes one ``prompt`` and returns
its vector unnormalized. ``dimensions`` smaller than the model's own is refused (a chat model's
embedding cannot be shortened); ``options`` and ``keep_alive`` are read and have no effect.
Embedding runs through the app's :class:`~finetune_kit.serve.runner.Runner`, between decoding steps.
"""

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from finetune_kit.errors import RequestError
from finetune_kit.models.engine import EmbeddingEngine
from finetune_kit.serve import ollama_wire as wire

if TYPE_CHECKING:
    from fastapi import Request
    from fastapi.responses import Response

    from finetune_kit.serve.runner import Runner


def install_ollama_embed_routes(
    route: Callable[..., Any],
    parse: Callable[..., Any],
    find: Callable[[str], Any],
    *,
    runner: "Runner",
) -> None:
    """Add ``/api/embed`` and ``/api/embeddings`` with ``install_ollama_routes``' ``route``, ``parse`` and
    ``find`` helpers, so they check the key, parse bodies and answer errors as every ``/api`` route does."""
    from fastapi.responses import JSONResponse

    from finetune_kit.serve.protocol import OllamaEmbeddingsRequest, OllamaEmbedRequest

    engine = runner.engine
    embedder = engine if isinstance(engine, EmbeddingEngine) else None
    context = engine.context_length

    def checked(texts: list[str], *, truncate: bool) -> tuple[EmbeddingEngine, int]:
        """The embedder and the tokens the texts take once truncated; a 400 for what cannot be embedded."""
        if embedder is None:
            raise RequestError(f"this server's engine ({type(engine).__name__}) cannot embed text")
        total = 0
        for i, text in enumerate(texts):
            count = len(embedder.encode_text(text))
            if count == 0:
                raise RequestError(f"input[{i}] has no tokens; send some text")
            if context and count > context and not truncate:
                raise RequestError(
                    f"input length exceeds the context length: input[{i}] takes {count} tokens and this model's "
                    f"context length is {context}. Fix: send truncate=true, or shorten the input"
                )
            total += min(count, context or count)
        return embedder, total

    async def run(fn: Callable[[], list[list[float]]]) -> list[list[float]]:
        result: list[list[float]] = await runner.call(fn)
        return result

    @route("/api/embed", ["POST"])
    async def embed(request: "Request") -> "Response":
        started = time.perf_counter_ns()
        body = await parse(request, OllamaEmbedRequest)
        find(body.model)
        wire.unloads(body.keep_alive)
        texts = ([body.input] if body.input else []) if isinstance(body.input, str) else list(body.input or [])
        if not texts:  # Ollama loads the model and answers with no embeddings
            return JSONResponse({"model": body.model, "embeddings": []})
        truncate = body.truncate is not False
        model, tokens = checked(texts, truncate=truncate)
        if body.dimensions and 0 < body.dimensions < model.embedding_size:
            raise RequestError(
                f"dimensions: this model's embeddings have {model.embedding_size} dimensions and cannot be "
                f"shortened to {body.dimensions}. Fix: leave dimensions out"
            )
        began: list[int] = []

        def work() -> list[list[float]]:
            began.append(time.perf_counter_ns())
            return model.embed(texts, max_tokens=context if truncate else None)

        vectors = await run(work)
        durations = {"total_duration": time.perf_counter_ns() - started, "load_duration": began[0] - started}
        return JSONResponse({"model": body.model, "embeddings": vectors, **durations, "prompt_eval_count": tokens})

    @route("/api/embeddings", ["POST"])
    async def embeddings(request: "Request") -> "Response":
        body = await parse(request, OllamaEmbeddingsRequest)
        find(body.model)
        wire.unloads(body.keep_alive)
        if not body.prompt:  # an empty request loads the model
            return JSONResponse({"embedding": []})
        model, _ = checked([body.prompt], truncate=False)
        vectors = await run(lambda: model.embed([body.prompt], normalize=False))
        return JSONResponse({"embedding": vectors[0]})
