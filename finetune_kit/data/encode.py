"""LLaMA-Factory's encodings, one example (or one batch of 1000) at a time.

Supervised (``sft``), pairwise (``rm``/``dpo``), KTO and pre-training text, each producing the
columns LLaMA-Factory 0.9.5 produces for the same data, template and options (the golden files
in tests/data/parity prove it), plus its supervised packing. :func:`encode_batch` is the entry
point; :func:`finetune_kit.data.tokenize.tokenize` runs it over a whole dataset.
"""

from __future__ import annotations

import bisect
import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

from finetune_kit.data.batched import Prefetched, Replay
from finetune_kit.errors import DatasetError

if TYPE_CHECKING:
    from finetune_kit.data.conversations import Example
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
        if neat_packing:  # whole texts (cut to the budget), several to a row, none attending to another
            texts, cut = _encode_text(items, tokenizer, template, cutoff_len, False)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            return _pack_sft(texts, pad, cutoff_len, True), cut
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
    for i, example_ids in enumerate(columns["input_ids"]):
        if len(example_ids) <= cutoff_len:
            lengths.append(len(example_ids))
            by_length.setdefault(len(example_ids), []).append(i)
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
    proxy = Prefetched(tokenizer)
    replay = cast("ChatTemplate", Replay(template))
    try:
        _encode_all(items, proxy, replay, *args)  # first pass: the layouts, each text piece a placeholder
    except Exception:  # an encoding problem: the plain pass below reports it with its example
        return _encode_all(items, tokenizer, template, *args)
    proxy.prefetch()
    replay.fill = proxy.fill  # type: ignore[attr-defined]
    return _encode_all(items, proxy, replay, *args)


def fitted(tokenizer: Any, template: ChatTemplate) -> Any:
    """``tokenizer`` as ``template`` needs it (EOS replaced, stop words special): itself when it
    already is (the library's loaders fit it), else a fitted copy — the caller's is never changed."""
    if template.is_fitted(tokenizer):
        return tokenizer
    probe = copy.deepcopy(tokenizer)
    template.fit_tokenizer(probe)
    return probe


STAGES = ("sft", "pt", "rm", "dpo", "kto")
