"""The decoding engine seam: what the server and the Evaluator need from a model that generates text.

:class:`LoadedModel` is the Hugging Face engine (its decoding code lives in
``models/decoding.py``). Another backend (continuous batching, vLLM, llama.cpp for GGUF) only
has to satisfy :class:`Engine` to be served or evaluated; ``serve/`` and ``evaluate/`` never
look past this protocol.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from finetune_kit.data.template import Message
from finetune_kit.errors import FinetuneKitError
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.models.sampling import NO_EXTRAS, SamplingExtras

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Completion:
    """One generated reply with its token counts and why it ended."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


@runtime_checkable
class Engine(Protocol):
    """A text generator over one chat template.

    ``name`` is the short model id a server lists; ``context_length`` the most tokens a prompt
    plus its reply may take (``None`` when unknown); ``max_concurrency`` how many generations
    the engine runs at once (requests beyond it wait).
    """

    @property
    def name(self) -> str: ...

    @property
    def context_length(self) -> int | None: ...

    @property
    def max_concurrency(self) -> int: ...

    def encode_prompt(self, messages: str | Sequence[Message], system: str | None = None) -> list[int]: ...

    def render_prompt(self, messages: Sequence[Message]) -> str: ...

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        generation: GenerationConfig | None = None,
        *,
        batch_size: int = 8,
        stop: Sequence[str] = (),
    ) -> list[Completion]: ...

    def stream(
        self,
        messages: str | Sequence[Message],
        generation: GenerationConfig | None = None,
        *,
        system: str | None = None,
        stop: Sequence[str] = (),
    ) -> Iterator[str | Completion]: ...


@runtime_checkable
class TextCompletionEngine(Protocol):
    """What an :class:`Engine` adds to continue raw text (no chat template): ``/v1/completions``.

    ``encode_text`` gives the token ids of a raw prompt (what ``complete`` and ``stream_text``
    feed the model), so a server can count and check them first. Optional: a server answers
    ``/v1/completions`` with a 400 for an engine without it.
    """

    def encode_text(self, text: str) -> list[int]: ...

    def complete(
        self,
        prompts: Sequence[str],
        generation: GenerationConfig | None = None,
        *,
        batch_size: int = 8,
        stop: Sequence[str] = (),
    ) -> list[Completion]: ...

    def stream_text(
        self, prompt: str, generation: GenerationConfig | None = None, *, stop: Sequence[str] = ()
    ) -> Iterator[str | Completion]: ...


@runtime_checkable
class EmbeddingEngine(Protocol):
    """What an :class:`Engine` adds to embed text: ``/v1/embeddings``, Ollama's ``/api/embed``.

    ``embed`` returns one vector of ``embedding_size`` floats per text, L2-normalized unless
    ``normalize`` is false, from at most ``max_tokens`` tokens of each text (all when None).
    Optional, like :class:`TextCompletionEngine`.
    """

    @property
    def embedding_size(self) -> int: ...

    def encode_text(self, text: str) -> list[int]: ...

    def embed(
        self, texts: Sequence[str], *, batch_size: int = 8, normalize: bool = True, max_tokens: int | None = None
    ) -> list[list[float]]: ...


class Overloaded(FinetuneKitError, RuntimeError):
    """Too many requests are waiting already; the client should retry later (a server answers 429 or 503)."""


@dataclass(frozen=True)
class GenerationRequest:
    """One generation for a :class:`Scheduler`: the prompt's token ids, settings, stop strings, OpenAI
    sampling extras, and the LoRA adapter to use (``None``: the model as loaded; ``"__base__"``:
    the base model without any adapter). ``stream`` false: the sink gets only the Completion (no text
    pieces), which saves decoding text at every step."""

    prompt: Sequence[int]
    generation: GenerationConfig
    stop: Sequence[str] = ()
    extras: SamplingExtras = NO_EXTRAS
    adapter: str | None = None
    stream: bool = True


class Ticket:
    """A submitted request; :meth:`cancel` ends it before its next decoding step."""

    def __init__(self) -> None:
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


Item = str | Completion | BaseException
"""What a scheduler hands a request's sink: text pieces, then one Completion, or the exception that ended it."""


class Scheduler(Protocol):
    """Runs many :class:`GenerationRequest` s at once (continuous batching)."""

    def submit(self, request: GenerationRequest, sink: Callable[[Item], None]) -> Ticket: ...

    def call(self, fn: Callable[[], Any]) -> Future[Any]: ...

    def close(self) -> None: ...


@runtime_checkable
class BatchingEngine(Protocol):
    """What an :class:`Engine` adds to share forward passes between requests: a :class:`Scheduler`.

    ``adapter_names`` lists the LoRA adapters a request may choose by name (empty: none).
    """

    @property
    def adapter_names(self) -> tuple[str, ...]: ...

    def scheduler(self, *, max_batch: int, max_queued: int) -> Scheduler: ...
