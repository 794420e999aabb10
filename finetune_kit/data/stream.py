"""Streaming: interleaving datasets that are read lazily, and tokenizing them batch by batch.

The in-memory path (:func:`finetune_kit.data.mix.mix`, :func:`finetune_kit.data.tokenize.tokenize`)
sees every row before it starts; a stream never does. So rows are drawn from the datasets one at
a time, and tokenized in batches of the same size LLaMA-Factory's ``datasets.map`` uses, which
keeps every encoding (KTO's KL pairing, pre-training blocks) identical to the in-memory result.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from finetune_kit.data.conversations import ConversationStream, Example
from finetune_kit.data.tokenize import KTO_BATCH, TokenizedDataset, encode_batch, fitted

if TYPE_CHECKING:
    from finetune_kit.data.template import ChatTemplate


def interleave_stream(
    parts: Callable[[], list[Iterator[Example]]],
    probs: Sequence[float] | None,
    *,
    until_all: bool,
    seed: int,
) -> Iterator[Example]:
    """Draw examples from several streams at random (``probs``; equal chances when None).

    Without ``until_all`` it stops when the first stream runs out (``interleave_under``); with it,
    a stream that runs out starts again until every stream has run out once (``interleave_over``).
    """
    streams = parts()
    weights = list(probs) if probs is not None else [1.0] * len(streams)
    done = [False] * len(streams)
    rng = random.Random(seed)
    while True:
        k = rng.choices(range(len(streams)), weights=weights)[0]
        try:
            yield next(streams[k])
        except StopIteration:
            if not until_all:
                return
            done[k] = True
            if all(done):
                return
            streams[k] = parts()[k]
            try:
                yield next(streams[k])
            except StopIteration:  # an empty dataset: nothing to repeat
                return


def batches(examples: Iterator[Example], size: int) -> Iterator[list[Example]]:
    while batch := list(itertools.islice(examples, size)):
        yield batch


def tokenize_stream(
    stream: ConversationStream,
    tokenizer: Any,
    template: ChatTemplate,
    *,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    stage: str = "sft",
    packing: bool | None = None,
) -> TokenizedDataset:
    """A :class:`TokenizedDataset` over a ``datasets.IterableDataset``: rows are encoded as training reads them.

    Encoding is :func:`~finetune_kit.data.tokenize.tokenize`'s, batch by batch (1000 examples), so
    a streamed example gets the same tokens as a loaded one. Rows are shuffled in a buffer of the
    stream's ``buffer_size`` with its ``seed`` (LLaMA-Factory's streaming shuffle).
    """
    import datasets

    tokenizer = fitted(tokenizer, template)

    def rows() -> Iterator[dict[str, Any]]:
        for batch in batches(iter(stream), KTO_BATCH):
            columns, _ = encode_batch(
                batch, tokenizer, template, stage, cutoff_len, train_on_prompt, mask_history, packing
            )
            keys = list(columns)
            for values in zip(*(columns[k] for k in keys), strict=True):
                yield dict(zip(keys, values, strict=True))

    dataset = datasets.IterableDataset.from_generator(rows).shuffle(seed=stream.seed, buffer_size=stream.buffer_size)
    return TokenizedDataset(
        dataset,
        cutoff_len,
        0,
        template=template.name,
        train_on_prompt=train_on_prompt,
        mask_history=mask_history,
        names=stream.names,
        tokenizer=tokenizer,
        stage=stage,
    )
