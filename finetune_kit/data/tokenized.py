"""TokenizedDataset: encoded examples plus how they were encoded."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from finetune_kit.data.encode import IGNORE_INDEX
from finetune_kit.data.packed import PackedCollator, VarlenCollator
from finetune_kit.errors import DatasetError


@dataclass(frozen=True)
class TokenizedDataset:
    """Tokenized examples as a ``datasets.Dataset`` with input_ids, attention_mask and labels.

    It remembers how it was encoded (template, cutoff and masking), so a trainer can refuse one
    made for other settings, and it supplies the collator that batches it.
    """

    dataset: Any
    cutoff_len: int
    truncated: int
    template: str = ""
    train_on_prompt: bool = False
    mask_history: bool = False
    names: tuple[str, ...] = ()
    tokenizer: Any = field(default=None, repr=False, compare=False)
    stage: str = "sft"

    def collator(self, tokenizer: Any, *, varlen: bool = False) -> Any:
        """The data collator for this layout: right-padding, labels padded with -100; for packed rows a
        :class:`~finetune_kit.data.packed.PackedCollator` (padding-free, attention within each example);
        with ``varlen`` a :class:`~finetune_kit.data.packed.VarlenCollator` (the whole batch as one row, for
        the variable-length attention kernel of :mod:`finetune_kit.models.varlen`)."""
        from transformers import DataCollatorForSeq2Seq

        if self.stage in ("rm", "dpo", "kto"):
            raise DatasetError(
                f"{self.stage} data (chosen/rejected or kto columns) is batched by the preference trainer, "
                "not by this collator"
            )
        if varlen:
            return VarlenCollator()
        if self.packed:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            return PackedCollator(pad_token_id=pad)
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)

    @property
    def packed(self) -> bool:
        """True when each row holds several whole examples with restarting ``position_ids`` (packing)."""
        names = getattr(self.dataset, "column_names", None) or ()
        return "position_ids" in names

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError("a streamed TokenizedDataset has no length: its rows are encoded as training reads them")
        return len(self.dataset)

    @property
    def streaming(self) -> bool:
        """True when the rows are encoded lazily from a :class:`ConversationStream`."""
        return not hasattr(self.dataset, "__len__")

    def __repr__(self) -> str:
        if self.streaming:
            return (
                f"TokenizedDataset(streamed from {', '.join(self.names) or 'a stream'}: encoded as read, "
                f"cutoff_len={self.cutoff_len})"
            )
        return (
            f"TokenizedDataset({len(self)} examples, {self.num_tokens} tokens, {self.num_trained_tokens} trained, "
            f"cutoff_len={self.cutoff_len}, truncated={self.truncated})"
        )

    @property
    def _prefix(self) -> str:
        return "chosen_" if self.stage in ("rm", "dpo") else ""

    @property
    def num_tokens(self) -> int:
        return sum(len(x) for x in self.dataset[self._prefix + "input_ids"])

    @property
    def num_trained_tokens(self) -> int:
        return sum(sum(1 for t in x if t != IGNORE_INDEX) for x in self.dataset[self._prefix + "labels"])

    def show(self, index: int = 0, tokenizer: Any = None) -> str:
        """The decoded inputs and trained labels of one example (LLaMA-Factory prints this at start-up)."""
        if self.streaming:  # the first rows of the stream (reading them encodes one batch)
            row = next(itertools.islice(iter(self.dataset), index, None))
        else:
            row = self.dataset[index]
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        parts = ("chosen_", "rejected_") if self._prefix else ("",)
        out = []
        for p in parts:
            ids, labels = row[p + "input_ids"], row[p + "labels"]
            if tokenizer is None:
                out.append(f"{p}input_ids: {ids}\n{p}labels: {labels}")
                continue
            trained = [t for t in labels if t != IGNORE_INDEX]
            out.append(
                f"{p}inputs:\n{tokenizer.decode(ids, skip_special_tokens=False)}\n"
                f"{p}labels:\n{tokenizer.decode(trained, skip_special_tokens=False)}"
            )
        return "\n".join(out)
