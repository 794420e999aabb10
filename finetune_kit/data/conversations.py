"""Conversations: checked, normalized examples, ready to split, tokenize or prompt a model.

Pure values: reading them is :class:`~finetune_kit.data.registry.DatasetRegistry`'s job,
tokenizing them is :func:`finetune_kit.data.tokenize.tokenize`'s.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from finetune_kit.data.messages import Message
from finetune_kit.errors import DatasetError


@dataclass(frozen=True)
class Example:
    """One conversation (an optional system message, then alternating turns) and where it came from.

    What the turns end with depends on the data's purpose: supervised data ends with the reply
    to train on; pre-training text is one user message holding the text; preference data ends
    with the chosen reply and carries the ``rejected`` one; KTO data carries ``kto_tag`` (is the
    last reply desirable). ``tools`` is the JSON tool list of function-calling rows.
    """

    messages: tuple[Message, ...]
    source: str  # "file, row N" for error messages and reports
    tools: str = ""
    rejected: Message | None = None
    kto_tag: bool | None = None

    @property
    def text(self) -> str:
        """Pre-training text: the first message after the system message (LLaMA-Factory's rule)."""
        body = [m for m in self.messages if m["role"] != "system"]
        return body[0]["content"] if body else ""

    @property
    def prompt_messages(self) -> list[Message]:
        """Everything before the last reply: what a model is asked at prediction time."""
        return list(self.messages[:-1])

    @property
    def label(self) -> str:
        """The last reply: the reference answer for prediction metrics."""
        return self.messages[-1]["content"]


@dataclass(frozen=True)
class Conversations:
    """A list of checked :class:`Example` objects from one or more datasets."""

    examples: tuple[Example, ...]
    names: tuple[str, ...] = ()
    skipped: int = 0
    """Bad rows dropped on request (``skip_invalid``); never more than zero otherwise."""

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __repr__(self) -> str:
        turns = sum(sum(m["role"] == "assistant" for m in e.messages) for e in self.examples)
        return f"Conversations({', '.join(self.names) or 'in-memory'}: {len(self)} examples, {turns} replies)"

    def head(self, n: int) -> Conversations:
        return Conversations(self.examples[:n], self.names, self.skipped)

    def split(self, val_size: float, *, seed: int = 42) -> tuple[Conversations, Conversations]:
        """Shuffle and hold out ``val_size`` (a fraction < 1 or a row count) for evaluation."""
        n = len(self)
        n_val = int(val_size) if val_size >= 1 else math.ceil(n * val_size)
        if not 0 < n_val < n:
            raise DatasetError(
                f"val_size={val_size} holds out {n_val} of {n} rows; it must leave at least one row on each side"
            )
        order = list(range(n))
        random.Random(seed).shuffle(order)
        pick = lambda idx: Conversations(tuple(self.examples[i] for i in sorted(idx)), self.names, self.skipped)  # noqa: E731
        return pick(order[n_val:]), pick(order[:n_val])


@dataclass(frozen=True)
class ConversationStream:
    """Examples read lazily from their files (LLaMA-Factory's ``streaming: true``).

    Iterating it reads the files again from the start; nothing is held in memory. Made by
    :meth:`DatasetRegistry.stream`; a bad row raises its error when it is met.
    """

    open: Callable[[], Iterator[Example]] = field(repr=False)
    names: tuple[str, ...] = ()
    buffer_size: int = 16384
    """Examples held for shuffling when this stream is tokenized for training."""
    seed: int = 42

    def __iter__(self) -> Iterator[Example]:
        return self.open()

    def __repr__(self) -> str:
        return f"ConversationStream({', '.join(self.names)}: read lazily)"
