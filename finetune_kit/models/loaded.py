"""LoadedModel: a model, its tokenizer and its chat template, ready to chat, train, evaluate or serve."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from finetune_kit.data.template import ChatTemplate, Message
from finetune_kit.models import decoding, embedding
from finetune_kit.models.adapters import add_adapter, add_named_adapters
from finetune_kit.models.batching import BatchScheduler
from finetune_kit.models.bundled import BUNDLED_PREFIX
from finetune_kit.models.engine import Completion, FinishReason
from finetune_kit.models.generation import GenerationConfig, resolve_generation

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from finetune_kit.models.generation import GenerationOverrides
    from finetune_kit.models.source import ModelSource

__all__ = ["Completion", "FinishReason", "LoadedModel"]


@dataclass(frozen=True)
class LoadedModel:
    """A loaded causal LM with its tokenizer and chat template; it is also an :class:`Engine`.

    ``model`` is a ``transformers`` model, or a ``peft.PeftModel`` when an adapter is applied.
    ``adapters`` lists the adapter folders applied, in order. Decoding is greedy unless you ask
    (see :data:`~finetune_kit.models.generation.DEFAULT_GENERATION`). Example::

        model = ModelSource.bundled().load()
        print(model.chat("你们包邮吗？", max_new_tokens=40))
        tuned = model.with_adapter("saves/shop")   # shares the base weights in memory
    """

    source: ModelSource
    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    template: ChatTemplate = field(repr=False)
    adapters: tuple[str, ...] = ()
    adapter_names: tuple[str, ...] = ()
    """Named LoRA adapters loaded side by side (:meth:`with_named_adapters`); a request picks one by name."""

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        adapters = f", adapters={list(self.adapters)}" if self.adapters else ""
        if self.adapter_names:
            adapters += f", adapter_names={list(self.adapter_names)}"
        return (
            f"LoadedModel({self.source.display_name}, {n / 1e6:.1f}M params, template={self.template.name}, "
            f"dtype={str(self.dtype).removeprefix('torch.')}, device={self.device}{adapters})"
        )

    @property
    def dtype(self) -> Any:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end a reply: EOS, the template's stop words and generation_config's EOS."""
        ids = self.template.stop_token_ids(self.tokenizer)
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for tid in [gen_eos] if isinstance(gen_eos, int) else (gen_eos or []):
            if tid not in ids:
                ids.append(int(tid))
        return ids

    @property
    def name(self) -> str:
        """A short id: the last adapter folder's name, else the model's last path part."""
        full = self.adapters[-1] if self.adapters else self.source.display_name.removeprefix(BUNDLED_PREFIX)
        return full.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]

    @property
    def context_length(self) -> int | None:
        """The most tokens a prompt plus its reply may take (the model config's max_position_embeddings)."""
        value = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return int(value) if isinstance(value, int) else None

    @property
    def max_concurrency(self) -> int:
        """Generations that may run side by side (each ``model.generate`` call in its own thread).

        An upper bound only: a server runs ``ServeConfig.max_concurrent`` at once (1 by default,
        as LLaMA-Factory does), capped by this.
        """
        return 8

    @property
    def embedding_size(self) -> int:
        """How many floats :meth:`embed` returns per text (the width of the token embeddings)."""
        return int(self.model.get_input_embeddings().weight.shape[-1])

    def with_adapter(self, path: str | os.PathLike[str]) -> LoadedModel:
        """A new LoadedModel with the LoRA adapter at ``path`` applied on top (not merged).

        Nothing is reloaded: the new model shares this one's weights in memory and only the
        adapter is read from disk. This model is left exactly as it was. Applying a second
        adapter on top of one merges the first into a copy of the layers it touches, as
        ``adapter_name_or_path: a,b`` does at load time.
        """
        folder = os.fspath(path)
        adapters = (*self.adapters, folder)
        return LoadedModel(
            source=self.source.with_config(adapter_name_or_path=adapters),
            model=add_adapter(self.model, folder),
            tokenizer=self.tokenizer,
            template=self.template,
            adapters=adapters,
        )

    def with_named_adapters(self, adapters: Mapping[str, str | os.PathLike[str]]) -> LoadedModel:
        """A new LoadedModel holding several LoRA adapters side by side, each chosen by its name.

        The adapters share this model's weights in memory (nothing is copied or merged); a server
        lists every name as a model, and one decoding batch can mix requests for the base model and
        for each adapter. Plain ``chat``/``generate`` calls use the first adapter. Example::

            multi = model.with_named_adapters({"shop": "saves/shop", "sql": "saves/sql"})
            Server(multi).run()   # models: the base name, "shop" and "sql"
        """
        named = {name: os.fspath(path) for name, path in adapters.items()}
        return LoadedModel(
            source=self.source,
            model=add_named_adapters(self.model, named),
            tokenizer=self.tokenizer,
            template=self.template,
            adapters=self.adapters,
            adapter_names=tuple(named),
        )

    def scheduler(self, *, max_batch: int = 32, max_queued: int = 256) -> BatchScheduler:
        """A continuous-batching scheduler over this model (what a Server generates with); see
        :class:`~finetune_kit.models.batching.BatchScheduler`."""
        return BatchScheduler(self, max_batch=max_batch, max_queued=max_queued)

    def tokenizer_with_template(self) -> Any:
        """A copy of the tokenizer whose ``chat_template`` renders this model's template (for saving)."""
        tok = copy.deepcopy(self.tokenizer)
        tok.chat_template = self.template.jinja()
        return tok

    def render_prompt(self, messages: Sequence[Message]) -> str:
        """The prompt text the template makes of ``messages``, ending where the reply starts."""
        return self.template.prompt(list(messages), self.tokenizer)

    def encode_prompt(self, messages: str | Sequence[Message], system: str | None = None) -> list[int]:
        """Token ids of the prompt for ``messages`` (a user string or a conversation)."""
        return self.template.encode_prompt(self.tokenizer, decoding.as_messages(messages, system))

    def chat(
        self,
        messages: str | Sequence[Message],
        generation: GenerationConfig | None = None,
        *,
        system: str | None = None,
        stop: Sequence[str] = (),
        **overrides: Unpack[GenerationOverrides],
    ) -> str:
        """Answer one conversation (or a single user string) and return the reply text.

        ``overrides`` are :class:`GenerationConfig` fields, e.g. ``max_new_tokens=64, do_sample=True``.
        """
        conversation = decoding.as_messages(messages, system)
        return self.generate([conversation], generation, stop=stop, **overrides)[0].text

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        generation: GenerationConfig | None = None,
        *,
        batch_size: int = 8,
        stop: Sequence[str] = (),
        **overrides: Unpack[GenerationOverrides],
    ) -> list[Completion]:
        """Generate replies for many conversations, in left-padded batches of ``batch_size``."""
        gen = resolve_generation(generation, overrides)
        return decoding.generate(self, conversations, gen, batch_size=batch_size, stop=stop)

    def stream(
        self,
        messages: str | Sequence[Message],
        generation: GenerationConfig | None = None,
        *,
        system: str | None = None,
        stop: Sequence[str] = (),
        **overrides: Unpack[GenerationOverrides],
    ) -> Iterator[str | Completion]:
        """Yield text pieces as they are generated, then one final :class:`Completion`."""
        gen = resolve_generation(generation, overrides)
        return decoding.stream(self, decoding.as_messages(messages, system), gen, stop=stop)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of raw ``text`` as the tokenizer makes them (with its BOS token, if it adds one), no template."""
        return list(self.tokenizer(text)["input_ids"])

    def complete(
        self,
        prompts: str | Sequence[str],
        generation: GenerationConfig | None = None,
        *,
        batch_size: int = 8,
        stop: Sequence[str] = (),
        **overrides: Unpack[GenerationOverrides],
    ) -> list[Completion]:
        """Continue raw text prompts, without the chat template: what ``/v1/completions`` serves.

        Each prompt is tokenized by :meth:`encode_text` and continued as ``model.generate`` would
        continue those ids; ``Completion.text`` holds only the new text. Example::

            model.complete("The capital of France is", max_new_tokens=5)[0].text
        """
        gen = resolve_generation(generation, overrides)
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        return decoding.generate_ids(self, self._raw_ids(texts), gen, batch_size=batch_size, stop=stop)

    def stream_text(
        self,
        prompt: str,
        generation: GenerationConfig | None = None,
        *,
        stop: Sequence[str] = (),
        **overrides: Unpack[GenerationOverrides],
    ) -> Iterator[str | Completion]:
        """:meth:`complete` for one prompt, yielding text pieces as they come, then one :class:`Completion`."""
        gen = resolve_generation(generation, overrides)
        return decoding.stream_ids(self, self._raw_ids([prompt])[0], gen, stop=stop)

    def embed(
        self, texts: str | Sequence[str], *, batch_size: int = 8, normalize: bool = True, max_tokens: int | None = None
    ) -> list[list[float]]:
        """One embedding per text: the mean of the last hidden state over its tokens, L2-normalized.

        Texts are tokenized by :meth:`encode_text`; ``max_tokens`` keeps only the first tokens of a
        longer text. Batching does not change a vector (padding is on the right). Example::

            a, b = model.embed(["where is my parcel?", "has my order shipped?"])
            similarity = sum(x * y for x, y in zip(a, b))
        """
        ids = [self.encode_text(t) for t in ([texts] if isinstance(texts, str) else texts)]
        if max_tokens is not None:
            ids = [p[:max_tokens] for p in ids]
        return embedding.embed_ids(self, ids, batch_size=batch_size, normalize=normalize)

    def _raw_ids(self, texts: Sequence[str]) -> list[list[int]]:
        ids = [self.encode_text(t) for t in texts]
        for i, p in enumerate(ids):
            if not p:
                raise ValueError(
                    f"prompt {i} ({texts[i]!r}) has no tokens (this tokenizer adds no BOS token); "
                    "a raw prompt needs at least one token"
                )
        return ids
