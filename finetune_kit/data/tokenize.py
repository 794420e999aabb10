"""Turning conversations into ``input_ids`` and ``labels`` (LLaMA-Factory's supervised encoding)."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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
    tools: str = "",
) -> tuple[list[int], list[int]]:
    """Encode one conversation turn by turn within ``cutoff_len`` tokens; return ids and labels."""
    ids, labels, _ = _encode_sft(messages, tools, tokenizer, template, cutoff_len, train_on_prompt, mask_history)
    return ids, labels


def _encode_sft(
    messages: list[dict[str, str]],
    tools: str,
    tokenizer: Any,
    template: ChatTemplate,
    cutoff_len: int,
    train_on_prompt: bool,
    mask_history: bool,
) -> tuple[list[int], list[int], int]:
    """LLaMA-Factory's supervised encoding; also returns the untruncated length."""
    pairs = template.encode_pairs(tokenizer, messages, tools=tools, mask_history=mask_history)
    eos = tokenizer.eos_token_id
    efficient = template.efficient_eos
    input_ids: list[int] = []
    labels: list[int] = []
    total = 1 if efficient else 0
    # With mask_history only the last reply is trained, so fill the budget from the last turn
    # backwards (as LLaMA-Factory does): truncation then drops history, never the trained reply.
    if mask_history:
        pairs = pairs[::-1]
    for turn, (source, target) in enumerate(pairs):
        if total >= cutoff_len:
            break
        src_len, tgt_len = infer_seqlen(len(source), len(target), cutoff_len - total)
        source, target = source[:src_len], target[:tgt_len]
        total += src_len + tgt_len
        if train_on_prompt:
            source_labels = source
        elif efficient and turn != 0:  # the reply before this prompt ends here: its EOS is learned at this spot
            source_labels = [eos] + [IGNORE_INDEX] * (src_len - 1)
        else:
            source_labels = [IGNORE_INDEX] * src_len
        target_labels = [IGNORE_INDEX] * tgt_len if mask_history and turn != 0 else target
        if mask_history:
            input_ids = source + target + input_ids
            labels = source_labels + target_labels + labels
        else:
            input_ids += source + target
            labels += source_labels + target_labels
    if efficient:
        input_ids.append(eos)
        labels.append(eos)
    full = sum(len(s) + len(t) for s, t in pairs) + (1 if efficient else 0)
    return input_ids, labels, full


def _encode_oneturn(
    messages: list[dict[str, str]], tools: str, tokenizer: Any, template: ChatTemplate
) -> tuple[list[int], list[int]]:
    prompt, reply = template.encode_oneturn(tokenizer, messages, tools=tools)
    if template.efficient_eos:
        reply = reply + [tokenizer.eos_token_id]
    return prompt, reply


def _encode_pairwise(
    ex: Example, tokenizer: Any, template: ChatTemplate, cutoff_len: int
) -> tuple[dict[str, list[int]], bool]:
    """LLaMA-Factory's pairwise encoding: one prompt, chosen and rejected cut to the same budget."""
    if ex.rejected is None:
        raise DatasetError("this example has no rejected reply; load preference data with stage='dpo'")
    chosen_msgs = list(ex.messages)
    prompt, chosen = _encode_oneturn(chosen_msgs, ex.tools, tokenizer, template)
    _, rejected = _encode_oneturn([*chosen_msgs[:-1], ex.rejected], ex.tools, tokenizer, template)
    src_len, tgt_len = infer_seqlen(len(prompt), max(len(chosen), len(rejected)), cutoff_len)
    cut = src_len < len(prompt) or tgt_len < max(len(chosen), len(rejected))
    prompt, chosen, rejected = prompt[:src_len], chosen[:tgt_len], rejected[:tgt_len]
    masked = [IGNORE_INDEX] * src_len
    row = {
        "chosen_input_ids": prompt + chosen,
        "chosen_attention_mask": [1] * (src_len + len(chosen)),
        "chosen_labels": masked + chosen,
        "rejected_input_ids": prompt + rejected,
        "rejected_attention_mask": [1] * (src_len + len(rejected)),
        "rejected_labels": masked + rejected,
    }
    return row, cut


def _encode_cut(prompt: list[int], reply: list[int], cutoff_len: int) -> tuple[list[int], list[int], bool]:
    src_len, tgt_len = infer_seqlen(len(prompt), len(reply), cutoff_len)
    cut = src_len < len(prompt) or tgt_len < len(reply)
    return prompt[:src_len] + reply[:tgt_len], [IGNORE_INDEX] * src_len + reply[:tgt_len], cut


KTO_BATCH = 1000
"""LLaMA-Factory pairs each KTO example with the previous one's reply (the KL term) inside map batches of 1000."""


def _encode_kto(
    examples: list[Example], tokenizer: Any, template: ChatTemplate, cutoff_len: int
) -> tuple[dict[str, list[Any]], int]:
    cols: dict[str, list[Any]] = {
        k: []
        for k in ("input_ids", "attention_mask", "labels", "kl_input_ids", "kl_attention_mask", "kl_labels", "kto_tags")
    }
    truncated = 0
    for start in range(0, len(examples), KTO_BATCH):
        batch = examples[start : start + KTO_BATCH]
        for i, ex in enumerate(batch):
            if ex.kto_tag is None:
                raise DatasetError(f"{ex.source}: KTO needs a kto_tag; load the data with stage='kto'")
            kl_reply = batch[i - 1].messages[-1] if i > 0 else batch[-1].messages[-1]
            msgs = list(ex.messages)
            ids, labels, cut = _encode_cut(*_encode_oneturn(msgs, ex.tools, tokenizer, template), cutoff_len)
            kl_ids, kl_labels, _ = _encode_cut(
                *_encode_oneturn([*msgs[:-1], kl_reply], ex.tools, tokenizer, template), cutoff_len
            )
            truncated += cut
            for key, value in (
                ("input_ids", ids),
                ("attention_mask", [1] * len(ids)),
                ("labels", labels),
                ("kl_input_ids", kl_ids),
                ("kl_attention_mask", [1] * len(kl_ids)),
                ("kl_labels", kl_labels),
                ("kto_tags", bool(ex.kto_tag)),
            ):
                cols[key].append(value)
    return cols, truncated


def _encode_text(
    examples: list[Example], tokenizer: Any, template: ChatTemplate, cutoff_len: int, packing: bool
) -> tuple[dict[str, list[Any]], int]:
    """LLaMA-Factory's pre-training encoding: text + EOS; packed into ``cutoff_len`` blocks by default.

    Blocks are cut from the texts of each batch of 1000 examples joined end to end; the last,
    partial block of a batch is dropped, as in LLaMA-Factory.
    """
    eos = "<|end_of_text|>" if template.name == "llama3" else tokenizer.eos_token
    bos = getattr(tokenizer, "add_bos_token", False)
    ids_out: list[list[int]] = []
    truncated = 0
    for start in range(0, len(examples), KTO_BATCH):
        texts = [ex.text + eos for ex in examples[start : start + KTO_BATCH]]
        if not packing:
            if bos:
                texts = [tokenizer.bos_token + t for t in texts]
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
                truncated += len(ids) > cutoff_len
                ids_out.append(ids[:cutoff_len])
            continue
        joined = [t for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in ids]
        usable = len(joined) // cutoff_len * cutoff_len
        truncated += len(joined) > usable
        for i in range(0, usable, cutoff_len):
            block = joined[i : i + cutoff_len]
            if bos:
                block[0] = tokenizer.bos_token_id
            ids_out.append(block)
    return {"input_ids": ids_out, "attention_mask": [[1] * len(x) for x in ids_out], "labels": ids_out}, truncated


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

    def collator(self, tokenizer: Any) -> Any:
        """The data collator for this layout: right-padding, labels padded with -100."""
        from transformers import DataCollatorForSeq2Seq

        if self.stage in ("rm", "dpo", "kto"):
            raise DatasetError(
                f"{self.stage} data (chosen/rejected or kto columns) is batched by the preference trainer, "
                "not by this collator"
            )

        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
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


def fitted(tokenizer: Any, template: ChatTemplate) -> Any:
    """``tokenizer`` as ``template`` needs it (EOS replaced, stop words special): itself when it
    already is (the library's loaders fit it), else a fitted copy — the caller's is never changed."""
    probe = copy.deepcopy(tokenizer)
    template.fit_tokenizer(probe)
    same = probe.eos_token == tokenizer.eos_token and probe.pad_token == tokenizer.pad_token
    same = same and len(probe) == len(tokenizer) and probe.all_special_tokens == tokenizer.all_special_tokens
    return tokenizer if same else probe


STAGES = ("sft", "pt", "rm", "dpo", "kto")


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
) -> TokenizedDataset:
    """Encode every example (a :class:`Conversations` or any iterable of :class:`Example`) once.

    ``stage`` picks LLaMA-Factory's encoding: ``sft`` (input_ids/labels, prompts masked),
    ``pt`` (text + EOS, packed into ``cutoff_len`` blocks unless ``packing=False``), ``dpo``/``rm``
    (chosen_* and rejected_* columns) or ``kto`` (plus the kl_* columns and kto_tags).
    """
    import datasets

    if stage not in STAGES:
        raise DatasetError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    tokenizer = fitted(tokenizer, template)
    items = list(examples)
    columns, truncated = _encode_all(
        items, tokenizer, template, stage, cutoff_len, train_on_prompt, mask_history, packing
    )
    return TokenizedDataset(
        datasets.Dataset.from_dict(columns),
        cutoff_len,
        truncated,
        template=template.name,
        train_on_prompt=train_on_prompt,
        mask_history=mask_history,
        names=tuple(getattr(examples, "names", ())),
        tokenizer=tokenizer,
        stage=stage,
    )


def _encode_all(
    items: list[Example],
    tokenizer: Any,
    template: ChatTemplate,
    stage: str,
    cutoff_len: int,
    train_on_prompt: bool,
    mask_history: bool,
    packing: bool | None,
) -> tuple[dict[str, list[Any]], int]:
    if stage == "pt":
        return _encode_text(items, tokenizer, template, cutoff_len, True if packing is None else packing)
    if stage == "kto":
        with _naming(items[0] if items else None):
            return _encode_kto(items, tokenizer, template, cutoff_len)
    columns: dict[str, list[Any]] = {}
    truncated = 0
    for ex in items:
        with _naming(ex):
            if stage == "sft":
                x, y, full = _encode_sft(
                    list(ex.messages), ex.tools, tokenizer, template, cutoff_len, train_on_prompt, mask_history
                )
                row, cut = {"input_ids": x, "attention_mask": [1] * len(x), "labels": y}, full > len(x)
            else:
                row, cut = _encode_pairwise(ex, tokenizer, template, cutoff_len)
        truncated += cut
        for key, value in row.items():
            columns.setdefault(key, []).append(value)
    return columns, truncated


@contextmanager
def _naming(ex: Example | None) -> Iterator[None]:
    """Name the example's file and row when encoding it fails."""
    try:
        yield
    except DatasetError:
        raise
    except Exception as exc:
        where = ex.source if ex is not None else "this data"
        raise DatasetError(f"{where}: cannot encode this conversation: {exc}") from exc
