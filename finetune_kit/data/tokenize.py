"""Turning conversations into ``input_ids`` and ``labels`` (LLaMA-Factory's supervised encoding)."""

from __future__ import annotations

import bisect
import copy
import gc
import logging
import multiprocessing
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from finetune_kit.errors import DatasetError

if TYPE_CHECKING:
    from finetune_kit.data.conversations import Example
    from finetune_kit.data.messages import Message
    from finetune_kit.data.template import ChatTemplate

IGNORE_INDEX = -100
logger = logging.getLogger("finetune_kit.data")


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


def _encode_all(
    items: list[Example],
    tokenizer: Any,
    template: ChatTemplate,
    stage: str,
    cutoff_len: int,
    train_on_prompt: bool,
    mask_history: bool,
    packing: bool | None,
    neat_packing: bool = False,
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
    if stage == "sft" and packing:
        packed: dict[str, list[Any]] = {}
        for start in range(0, len(items), KTO_BATCH):
            batch = {k: v[start : start + KTO_BATCH] for k, v in columns.items()}
            for key, value in _pack_sft(batch, tokenizer.pad_token_id, cutoff_len, neat_packing).items():
                packed.setdefault(key, []).extend(value)
        return packed, truncated
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


def _fit_count(lengths: list[int], capacity: int) -> int:
    """Index of the longest length that fits ``capacity`` in the sorted ``lengths`` (-1: none)."""
    return bisect.bisect(lengths, capacity) - 1


def knapsacks(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group lengths into bins of at most ``capacity``: each bin takes the longest that still fits."""
    left = sorted(lengths)
    bins = []
    while left:
        room, current = capacity, []
        while (i := _fit_count(left, room)) != -1:
            room -= left[i]
            current.append(left.pop(i))
        bins.append(current)
    return bins


def _pack_sft(columns: dict[str, list[Any]], pad_id: int, cutoff_len: int, neat: bool) -> dict[str, list[Any]]:
    """LLaMA-Factory's supervised packing of one batch: whole examples into rows of ``cutoff_len + 1``.

    ``cutoff_len`` is the encoding budget (LLaMA-Factory's cutoff_len - 1). Examples longer
    than it are left out, as LLaMA-Factory does; rows are filled by a greedy knapsack and padded.
    With ``neat`` the attention mask numbers each example (1, 2, ...) so attention can stay
    inside it; padding is then masked with 0.
    """
    by_length: dict[int, list[int]] = {}
    lengths = []
    for i, ids in enumerate(columns["input_ids"]):
        if len(ids) <= cutoff_len:
            lengths.append(len(ids))
            by_length.setdefault(len(ids), []).append(i)
    out: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "position_ids": [], "labels": []}
    for group in knapsacks(lengths, cutoff_len):
        ids: list[int] = []
        labels: list[int] = []
        mask: list[int] = []
        positions: list[int] = []
        for n, length in enumerate(group):
            index = by_length[length].pop()
            ids += columns["input_ids"][index]
            labels += columns["labels"][index]
            positions += list(range(length))
            mask += [n + 1 if neat else 1] * length
        pad = cutoff_len + 1 - len(ids)
        ids += [pad_id] * pad
        labels += [IGNORE_INDEX] * pad
        positions += [0] * pad
        mask += [0 if neat else 1] * pad
        for key, value in (
            ("input_ids", ids),
            ("attention_mask", mask),
            ("position_ids", positions),
            ("labels", labels),
        ):
            out[key].append(value)
    return out


# ----- parallel, batched encoding ---------------------------------------------------------------
# Work goes in batches of KTO_BATCH examples (LLaMA-Factory's map batches, which KTO pairing and
# pt packing depend on) and chunks of whole batches, so any number of workers gives the same rows.

COLUMNS = {
    "sft": ("input_ids", "attention_mask", "labels"),
    "pt": ("input_ids", "attention_mask", "labels"),
    "rm": tuple(f"{side}_{c}" for side in ("chosen", "rejected") for c in ("input_ids", "attention_mask", "labels")),
    "kto": ("input_ids", "attention_mask", "labels", "kl_input_ids", "kl_attention_mask", "kl_labels", "kto_tags"),
}
COLUMNS["dpo"] = COLUMNS["rm"]


@dataclass(frozen=True)
class _Job:
    items: list[Example]
    tokenizer: Any
    template: ChatTemplate
    stage: str
    cutoff_len: int
    train_on_prompt: bool
    mask_history: bool
    packing: bool | None
    neat_packing: bool

    def encode(self, batch: list[Example]) -> tuple[dict[str, list[Any]], int]:
        return encode_batch(
            batch,
            self.tokenizer,
            self.template,
            self.stage,
            self.cutoff_len,
            self.train_on_prompt,
            self.mask_history,
            self.packing,
            self.neat_packing,
        )

    def result(self, dataset: Any, truncated: int, names: tuple[str, ...]) -> TokenizedDataset:
        return TokenizedDataset(
            dataset,
            self.cutoff_len,
            truncated,
            template=self.template.name,
            train_on_prompt=self.train_on_prompt,
            mask_history=self.mask_history,
            names=names,
            tokenizer=self.tokenizer,
            stage=self.stage,
        )


_JOB: _Job | None = None
"""The job a worker process encodes (set in the worker only)."""


def _job(
    examples: Iterable[Example],
    tokenizer: Any,
    template: ChatTemplate,
    stage: str,
    cutoff_len: int,
    train_on_prompt: bool,
    mask_history: bool,
    packing: bool | None,
    neat_packing: bool,
) -> _Job:
    if stage not in STAGES:
        raise DatasetError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    tokenizer = fitted(tokenizer, template)
    items = list(examples)
    return _Job(items, tokenizer, template, stage, cutoff_len, train_on_prompt, mask_history, packing, neat_packing)


def _names(examples: Iterable[Example]) -> tuple[str, ...]:
    return tuple(getattr(examples, "names", ()))


def tokenize_to_dir(
    examples: Iterable[Example],
    tokenizer: Any,
    template: ChatTemplate,
    out_dir: Path,
    *,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    stage: str = "sft",
    packing: bool | None = None,
    neat_packing: bool = False,
    num_workers: int = 1,
) -> TokenizedDataset:
    """:func:`tokenize`, written batch by batch to Arrow files ``out_dir/data-NNNNN.arrow`` and
    memory-mapped from there (workers never hold their whole chunk in memory)."""
    job = _job(examples, tokenizer, template, stage, cutoff_len, train_on_prompt, mask_history, packing, neat_packing)
    paths, truncated = _run(job, num_workers, Path(out_dir))
    return job.result(read_arrow_files(paths), truncated, _names(examples))


def read_arrow_files(paths: Sequence[Path]) -> Any:
    """One memory-mapped ``datasets.Dataset`` over Arrow stream files, in order."""
    import datasets

    parts = [datasets.Dataset.from_file(str(p)) for p in paths]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _run(job: _Job, num_workers: int, out_dir: Path | None) -> tuple[list[Any], int]:
    """Encode ``job`` in contiguous chunks of whole batches; per chunk an Arrow table, or the file it wrote."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise DatasetError(f"num_workers={num_workers!r}; expected a whole number >= 1 (preprocessing_num_workers)")
    n = len(job.items)
    batches = max(1, -(-n // KTO_BATCH))
    per = -(-batches // min(num_workers, batches)) * KTO_BATCH
    chunks = [(i, start, min(start + per, n)) for i, start in enumerate(range(0, max(n, 1), per))]
    tasks = [(start, end, str(out_dir / f"data-{i:05d}.arrow") if out_dir else None) for i, start, end in chunks]
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    if len(tasks) > 1 and sys.platform != "linux":
        logger.info("preprocessing_num_workers needs fork (Linux); encoding in one process")
    if len(tasks) == 1 or sys.platform != "linux":
        done = [_encode_chunk(job, *task) for task in tasks]
    else:
        gc.freeze()  # the workers' garbage collector then leaves the parent's objects alone (no copy-on-write)
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # no fork warning from tokenizers; workers run serially
        try:
            # fork hands the job to the workers as it is: nothing is pickled but the results
            with multiprocessing.get_context("fork").Pool(len(tasks), _start_worker, (job,)) as pool:
                done = pool.starmap(_encode_in_worker, tasks, chunksize=1)
        finally:
            gc.unfreeze()
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous
    return [part for part, _ in done], sum(cut for _, cut in done)


def _start_worker(job: _Job) -> None:
    global _JOB
    _JOB = job
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _encode_in_worker(start: int, end: int, path: str | None) -> tuple[Any, int]:
    assert _JOB is not None  # set by _start_worker
    return _encode_chunk(_JOB, start, end, path)


def _encode_chunk(job: _Job, start: int, end: int, path: str | None) -> tuple[Any, int]:
    """Encode ``job.items[start:end]`` batch by batch into Arrow: a table, or a stream file at ``path``."""
    import pyarrow as pa

    tables, truncated, schema, writer = [], 0, None, None
    try:
        for s in range(start, max(end, start + 1), KTO_BATCH):
            columns, cut = job.encode(job.items[s : min(s + KTO_BATCH, end)])
            truncated += cut
            if schema is None:
                names = list(columns) or list(COLUMNS[job.stage])
                schema = pa.schema([(c, _arrow_type(c, job.neat_packing)) for c in names])
                writer = pa.ipc.new_stream(path, schema) if path else None
            table = pa.table({c: _arrow_column(columns.get(c, []), schema.field(c).type, c) for c in schema.names})
            if writer is not None:
                writer.write_table(table)
            else:
                tables.append(table)
    finally:
        if writer is not None:
            writer.close()
    return (path if path else _concat(tables)), truncated


def _arrow_type(column: str, neat_packing: bool) -> Any:
    """The Arrow type ``datasets.Dataset.from_dict`` would give the column (it narrows these two names)."""
    import pyarrow as pa

    if column == "kto_tags":
        return pa.bool_()
    narrow = {"input_ids": pa.int32(), "attention_mask": pa.int64() if neat_packing else pa.int8()}
    return pa.list_(narrow.get(column, pa.int64()))


def _arrow_column(values: list[Any], type_: Any, name: str = "") -> Any:
    """``pa.array(values, type_)``, ~8x faster for lists of ints: one flat numpy buffer plus offsets."""
    import numpy as np  # noqa: PLC0415  (heavy: loaded by datasets anyway, only when encoding)
    import pyarrow as pa

    if not pa.types.is_list(type_):
        return pa.array(values, type=type_)
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:
        return pa.array(values, type=type_)
    dtype, total = type_.value_type.to_pandas_dtype(), int(offsets[-1])
    if name.endswith("attention_mask") and all(v.count(1) == len(v) for v in values):
        flat = np.ones(total, dtype=dtype)  # the usual all-ones mask, without reading every element
    else:
        flat = np.fromiter(chain.from_iterable(values), dtype=dtype, count=total)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat), type=type_)


def _concat(tables: list[Any]) -> Any:
    import pyarrow as pa

    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def encode_batch(
    items: list[Example],
    tokenizer: Any,
    template: ChatTemplate,
    stage: str,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    packing: bool | None = None,
    neat_packing: bool = False,
) -> tuple[dict[str, list[Any]], int]:
    """Encode one batch (up to ``KTO_BATCH`` examples) into columns; returns them and the truncated count.

    What :func:`tokenize` does to each batch (streams call it too). ``cutoff_len`` is the user's;
    explicit packing keeps one token of it, as LLaMA-Factory does. ``tokenizer`` must be fitted to
    the template (:func:`fitted`). Every text piece of the batch goes through one batched
    tokenizer call instead of one call each, and the template lays each conversation out once:
    the ids are the same as encoding piece by piece.
    """
    if neat_packing:
        packing = True
    budget = cutoff_len - 1 if packing else cutoff_len
    args = (stage, budget, train_on_prompt, mask_history, packing, neat_packing)
    if stage == "pt" or not items:  # pt already encodes its texts in one call per batch
        return _encode_all(items, tokenizer, template, *args)
    proxy = _Prefetched(tokenizer)
    replay = cast("ChatTemplate", _Replay(template))
    try:
        _encode_all(items, proxy, replay, *args)  # first pass: the layouts, each text piece a placeholder
    except Exception:  # an encoding problem: the plain pass below reports it with its example
        return _encode_all(items, tokenizer, template, *args)
    proxy.prefetch()
    replay.fill = proxy.fill  # type: ignore[attr-defined]
    return _encode_all(items, proxy, replay, *args)


class _Prefetched:
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


class _Replay:
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
