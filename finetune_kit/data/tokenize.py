"""Turning conversations into training tokens: :func:`tokenize` over a whole dataset.

The encodings themselves (LLaMA-Factory's, token for token) are in :mod:`finetune_kit.data.encode`,
the parallel runner in :mod:`finetune_kit.data.workers`, the result type in
:mod:`finetune_kit.data.tokenized`; their public names are importable from here too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from finetune_kit.data.encode import (
    IGNORE_INDEX,
    KTO_BATCH,
    STAGES,
    encode_batch,
    encode_conversation,
    fitted,
    infer_seqlen,
)
from finetune_kit.data.tokenized import TokenizedDataset
from finetune_kit.data.workers import _concat, _job, _names, _run, read_arrow_files, tokenize_to_dir

if TYPE_CHECKING:
    from finetune_kit.data.conversations import Example
    from finetune_kit.data.template import ChatTemplate

__all__ = [
    "IGNORE_INDEX",
    "KTO_BATCH",
    "STAGES",
    "TokenizedDataset",
    "encode_batch",
    "encode_conversation",
    "fitted",
    "infer_seqlen",
    "read_arrow_files",
    "tokenize",
    "tokenize_to_dir",
]


def tokenize(
    examples: Iterable[Example],
    tokenizer: Any,
    template: ChatTemplate,
    *,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    stage: str = "sft",
    packing: bool | None = None,
    neat_packing: bool = False,
    num_workers: int = 1,
) -> TokenizedDataset:
    """Encode every example (a :class:`Conversations` or any iterable of :class:`Example`) once.

    ``stage`` picks LLaMA-Factory's encoding: ``sft`` (input_ids/labels, prompts masked),
    ``pt`` (text + EOS, packed into ``cutoff_len`` blocks unless ``packing=False``), ``dpo``/``rm``
    (chosen_* and rejected_* columns) or ``kto`` (plus the kl_* columns and kto_tags).
    ``packing=True`` (``neat_packing`` implies it) encodes within ``cutoff_len - 1`` tokens, as
    LLaMA-Factory does. ``num_workers`` is LLaMA-Factory's ``preprocessing_num_workers``: the examples are split into
    that many contiguous chunks, encoded in forked processes (Linux; one process elsewhere), and
    joined in order, so the result is the same for any number of workers.

    Example::

        tokens = tokenize(train, tokenizer, get_template("chatml"), cutoff_len=1024, num_workers=4)
    """
    import datasets

    job = _job(examples, tokenizer, template, stage, cutoff_len, train_on_prompt, mask_history, packing, neat_packing)
    tables, truncated = _run(job, num_workers, None)
    table = _concat(tables)
    return job.result(datasets.Dataset(datasets.table.InMemoryTable(table)), truncated, _names(examples))
