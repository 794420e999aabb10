"""Batched tokenization: every text piece of a batch through one fast-tokenizer call.

:func:`finetune_kit.data.encode.encode_batch` lays each conversation out twice: first with
:class:`Prefetched` and :class:`Replay` recording which texts are needed, then, after one
batched call encodes them all, answering from that result. The ids equal one ``encode`` per piece.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finetune_kit.data.messages import Message
    from finetune_kit.data.template import ChatTemplate


class Prefetched:
    """A tokenizer stand-in that answers ``encode(text, add_special_tokens=False)`` from one batched call.

    While recording, it notes every text asked for and answers one placeholder id for it (below
    :data:`_MARK`); :meth:`prefetch` then encodes them all at once (a fast tokenizer gives the same
    ids as one ``encode`` per text, without the per-call overhead). Everything else goes to the
    tokenizer.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._index: dict[str, int] = {}
        self._ids: list[list[int]] | None = None

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        if add_special_tokens or kwargs:
            return self._tokenizer.encode(text, add_special_tokens=add_special_tokens, **kwargs)
        if self._ids is None:
            return [_MARK - self._index.setdefault(text, len(self._index))]
        i = self._index.get(text)
        return list(self._ids[i]) if i is not None else self._tokenizer.encode(text, add_special_tokens=False)

    def prefetch(self) -> None:
        texts = list(self._index)
        if not texts:
            self._ids = []
            return
        ids = self._tokenizer(texts[:1], add_special_tokens=False)["input_ids"]
        backend = _plain_backend(self._tokenizer)
        if backend is not None:  # the call above reset its truncation, padding and special-token splitting
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            ids += [e.ids for e in encode(texts[1:], add_special_tokens=False)]
        elif len(texts) > 1:
            ids += self._tokenizer(texts[1:], add_special_tokens=False)["input_ids"]
        self._ids = ids

    def fill(self, ids: list[int]) -> list[int]:
        """``ids`` with every placeholder replaced by its text's ids."""
        assert self._ids is not None
        out: list[int] = []
        for t in ids:
            if t <= _MARK:
                out += self._ids[_MARK - t]
            else:
                out.append(t)
        return out

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._tokenizer, name)
        setattr(self, name, value)  # transformers' special-token attributes are slow to look up; a batch reads many
        return value


_MARK = -(1 << 40)
"""Placeholder ids are ``_MARK - n`` for the n-th text: far below any real id and IGNORE_INDEX."""


class Replay:
    """A template stand-in: records each layout the first pass asks for, then hands it back filled in.

    The second pass asks for the same layouts in the same order (it encodes the same examples), so
    the template's work is done once. A call that does not match the record goes to the template.
    """

    def __init__(self, template: ChatTemplate) -> None:
        self._template = template
        self._calls: list[tuple[str, list[Message], dict[str, Any], Any]] = []
        self._next = 0
        self.fill: Any = None

    def encode_pairs(
        self, tokenizer: Any, messages: Sequence[Message], *, tools: str = "", mask_history: bool = False
    ) -> list[tuple[list[int], list[int]]]:
        out = self._call("encode_pairs", tokenizer, messages, {"tools": tools, "mask_history": mask_history})
        return out if self.fill is None else [(self.fill(a), self.fill(b)) for a, b in out]

    def encode_oneturn(
        self, tokenizer: Any, messages: Sequence[Message], *, tools: str = ""
    ) -> tuple[list[int], list[int]]:
        prompt, reply = self._call("encode_oneturn", tokenizer, messages, {"tools": tools})
        return (prompt, reply) if self.fill is None else (self.fill(prompt), self.fill(reply))

    def _call(self, name: str, tokenizer: Any, messages: Sequence[Message], kwargs: dict[str, Any]) -> Any:
        if self.fill is None:
            out = getattr(self._template, name)(tokenizer, messages, **kwargs)
            self._calls.append((name, list(messages), kwargs, out))
            return out
        if self._next < len(self._calls):
            recorded = self._calls[self._next]
            self._next += 1
            same = recorded[0] == name and recorded[2] == kwargs and len(recorded[1]) == len(messages)
            if same and all(a is b for a, b in zip(recorded[1], messages, strict=False)):
                return recorded[3]
        self._next = len(self._calls)  # out of step: the template encodes the rest itself
        fill, self.fill = self.fill, None
        try:
            return getattr(self._template, name)(tokenizer, messages, **kwargs)
        finally:
            self.fill = fill

    def __getattr__(self, name: str) -> Any:
        return getattr(self._template, name)


def _plain_backend(tokenizer: Any) -> Any:
    """The Rust tokenizer behind ``tokenizer`` when transformers' encoding only forwards to it, else None."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    if not isinstance(tokenizer, TokenizersBackend):
        return None
    cls = type(tokenizer)
    if any(getattr(cls, m) is not getattr(TokenizersBackend, m) for m in ("encode", "__call__", "_encode_plus")):
        return None  # a subclass that changes the text or the ids on the way
    return tokenizer.backend_tokenizer
