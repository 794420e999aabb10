"""Turning conversations into ``input_ids`` and ``labels`` (LLaMA-Factory's supervised encoding)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from finetune_kit.errors import DatasetError

if TYPE_CHECKING:
    from finetune_kit.data.conversations import Example
    from finetune_kit.data.template import ChatTemplate

IGNORE_INDEX = -100


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """Share a token budget between a prompt and its reply (LLaMA-Factory's rule).

    A short reply keeps all of itself and the prompt is cut; a short prompt keeps itself and the
    reply is cut; otherwise both shrink in proportion.
    """
    if target_len * 2 < cutoff_len:
        max_target = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target = cutoff_len - source_len
    else:
        max_target = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target = min(max_target, target_len)
    new_source = min(max(cutoff_len - new_target, 0), source_len)
    return new_source, new_target


def encode_conversation(
    messages: list[dict[str, str]],
    tokenizer: Any,
    template: ChatTemplate,
    *,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> tuple[list[int], list[int]]:
    """Encode one conversation turn by turn within ``cutoff_len`` tokens; return ids and labels."""
    ids, labels, _ = _encode(messages, tokenizer, template, cutoff_len, train_on_prompt, mask_history)
    return ids, labels


def _encode(
    messages: list[dict[str, str]],
    tokenizer: Any,
    template: ChatTemplate,
    cutoff_len: int,
    train_on_prompt: bool,
    mask_history: bool,
) -> tuple[list[int], list[int], int]:
    """:func:`encode_conversation` plus the untruncated length (to count truncated examples)."""
    pieces = template.segments(messages, tokenizer)
    pairs = [
        (
            tokenizer.encode(pieces[i][0], add_special_tokens=False),
            tokenizer.encode(pieces[i + 1][0], add_special_tokens=False),
        )
        for i in range(0, len(pieces) - 1, 2)
    ]
    input_ids: list[int] = []
    labels: list[int] = []
    total = 0
    last = len(pairs) - 1
    # With mask_history only the last reply is trained, so fill the budget from the last turn
    # backwards (as LLaMA-Factory does): truncation then drops history, never the trained reply.
    order = range(last, -1, -1) if mask_history else range(len(pairs))
    for turn in order:
        source, target = pairs[turn]
        if total >= cutoff_len:
            break
        src_len, tgt_len = infer_seqlen(len(source), len(target), cutoff_len - total)
        source, target = source[:src_len], target[:tgt_len]
        total += src_len + tgt_len
        source_labels = source if train_on_prompt else [IGNORE_INDEX] * src_len
        target_labels = target if (not mask_history or turn == last) else [IGNORE_INDEX] * tgt_len
        if mask_history:
            input_ids = source + target + input_ids
            labels = source_labels + target_labels + labels
        else:
            input_ids += source + target
            labels += source_labels + target_labels
    return input_ids, labels, sum(len(src) + len(tgt) for src, tgt in pairs)


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

    def collator(self, tokenizer: Any) -> Any:
        """The data collator for this layout: right-padding, labels padded with -100."""
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return (
            f"TokenizedDataset({len(self)} examples, {self.num_tokens} tokens, {self.num_trained_tokens} trained, "
            f"cutoff_len={self.cutoff_len}, truncated={self.truncated})"
        )

    @property
    def num_tokens(self) -> int:
        return sum(len(x) for x in self.dataset["input_ids"])

    @property
    def num_trained_tokens(self) -> int:
        return sum(sum(1 for t in x if t != IGNORE_INDEX) for x in self.dataset["labels"])

    def show(self, index: int = 0, tokenizer: Any = None) -> str:
        """The decoded inputs and trained labels of one example (LLaMA-Factory prints this at start-up)."""
        row = self.dataset[index]
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is None:
            return f"input_ids: {row['input_ids']}\nlabels: {row['labels']}"
        trained = [t for t in row["labels"] if t != IGNORE_INDEX]
        return (
            f"inputs:\n{tokenizer.decode(row['input_ids'], skip_special_tokens=False)}\n"
            f"labels:\n{tokenizer.decode(trained, skip_special_tokens=False)}"
        )


def tokenize(
    examples: Iterable[Example],
    tokenizer: Any,
    template: ChatTemplate,
    *,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> TokenizedDataset:
    """Encode every example (a :class:`Conversations` or any iterable of :class:`Example`) once."""
    import datasets

    ids, labels, truncated = [], [], 0
    for ex in examples:
        try:
            x, y, full = _encode(list(ex.messages), tokenizer, template, cutoff_len, train_on_prompt, mask_history)
        except Exception as exc:
            raise DatasetError(f"{ex.source}: cannot encode this conversation: {exc}") from exc
        truncated += full > len(x)
        ids.append(x)
        labels.append(y)
    ds = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": labels})
    return TokenizedDataset(
        ds,
        cutoff_len,
        truncated,
        template=template.name,
        train_on_prompt=train_on_prompt,
        mask_history=mask_history,
        names=tuple(getattr(examples, "names", ())),
        tokenizer=tokenizer,
    )
