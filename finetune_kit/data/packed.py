"""Batches of packed rows, padding-free: no attention mask, position ids that restart per example.

A packed row (``packing``/``neat_packing``, made by :mod:`finetune_kit.data.encode`) holds
several whole examples, each numbered from position 0. :class:`PackedCollator` batches such rows
for training so that the loss is exactly the loss of the same examples trained unpacked:

* the batch carries ``position_ids``, ``use_cache=False`` and **no** ``attention_mask``: transformers' mask builders
  (``masking_utils``, for sdpa, eager and flex attention; the flash-attention path likewise) then
  read each restart of the positions as the start of a new sequence and build a causal mask that
  never crosses an example boundary (``find_packed_sequence_indices``);
* the first label of every example is ignored, so no example is predicted from the end of the one
  before it (unpacked, that label is never predicted either: the causal shift drops it);
* the padding a row ends with is trimmed and the batch padded to its longest row; padding tokens
  are one-token "examples" of their own with ignored labels, so they touch nothing.

``transformers.DataCollatorWithFlattening`` follows the same conventions but joins the whole
batch into one row; with SDPA that costs a dense (batch x length)² mask and attention over it,
so rows stay at most ``cutoff_len`` long here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from finetune_kit.data.encode import IGNORE_INDEX


def real_length(positions: Sequence[int]) -> int:
    """Length of a packed row without its trailing padding (padding restarts at position 0 every token).

    A final one-token example is trimmed too: its only label is ignored and it attends to itself
    alone, so dropping it changes no loss or gradient.
    """
    n = len(positions)
    while n > 1 and positions[n - 1] == 0:
        n -= 1
    return n


def segment_starts(positions: Sequence[int]) -> list[int]:
    """Indices where an example starts in a packed row (its position id is not one more than the last)."""
    return [i for i, p in enumerate(positions) if i == 0 or p != positions[i - 1] + 1]


def training_row(row: dict[str, Any]) -> tuple[list[int], list[int], list[int], list[int]]:
    """``(input_ids, labels, position_ids, example starts)`` of one row as training sees it: a packed
    row without its trailing padding, a plain row numbered from 0, and the first label of every
    example ignored (no example is predicted from the end of the one before it)."""
    if "position_ids" in row:
        n = real_length(row["position_ids"])
        positions = list(row["position_ids"][:n])
    else:
        n = len(row["input_ids"])
        positions = list(range(n))
    labels = list(row["labels"][:n])
    starts = segment_starts(positions)
    for start in starts:
        labels[start] = IGNORE_INDEX
    return list(row["input_ids"][:n]), labels, positions, starts


@dataclass(frozen=True)
class PackedCollator:
    """Collate packed rows (``input_ids``, ``labels``, ``position_ids``) into a padding-free batch.

    ``pad_to_multiple_of`` rounds the batch length up (tensor-core friendly lengths on GPUs).
    Example::

        batch = PackedCollator(pad_token_id=tok.pad_token_id)([tokens.dataset[0], tokens.dataset[1]])
        loss = model(**batch).loss      # equal to the unpacked examples' loss
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        pieces = [training_row(row) for row in rows]
        width = max(len(ids) for ids, _, _, _ in pieces)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row_ids, row_labels, row_positions, _) in enumerate(pieces):
            n = len(row_ids)
            ids[i, :n] = torch.as_tensor(row_ids)
            labels[i, :n] = torch.as_tensor(row_labels)
            positions[i, :n] = torch.as_tensor(row_positions)
        # a key-value cache (use_cache defaults to true in most configs) turns the packed-sequence detection off
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "use_cache": False}


@dataclass(frozen=True)
class VarlenCollator:
    """Collate rows, packed or not, into one padding-free row for the variable-length attention kernel.

    Every example of the batch goes back to back into a single row: ``position_ids`` restart per
    example, the first label of each is ignored (as in :class:`PackedCollator`), and
    ``cu_seq_lens_q``/``cu_seq_lens_k`` (int32 example boundaries) with ``max_length_q``/``max_length_k``
    (the longest example) tell :mod:`finetune_kit.models.varlen` where attention stops. Not one
    padding token is computed. The loss is the padded batch's loss: the same trained tokens,
    normalised by their count. Example::

        batch = VarlenCollator()([tokens.dataset[0], tokens.dataset[1]])
        batch["input_ids"].shape        # (1, len(row 0) + len(row 1))
    """

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        bounds = [0]
        for row_ids, row_labels, row_positions, starts in map(training_row, rows):
            bounds += [len(ids) + s for s in starts[1:]] + [len(ids) + len(row_ids)]
            ids += row_ids
            labels += row_labels
            positions += row_positions
        cu = torch.tensor(bounds, dtype=torch.int32)
        longest = max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": longest,
            "max_length_k": longest,
            "use_cache": False,
        }
