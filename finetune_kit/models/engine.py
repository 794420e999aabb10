"""The decoding engine seam: what the server and the Evaluator need from a model that generates text.

:class:`LoadedModel` is the Hugging Face engine (its decoding code lives in
``models/decoding.py``). Another backend (continuous batching, vLLM, llama.cpp for GGUF) only
has to satisfy :class:`Engine` to be served or evaluated; ``serve/`` and ``evaluate/`` never
look past this protocol.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from finetune_kit.data.template import Message
from finetune_kit.models.generation import GenerationConfig

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
