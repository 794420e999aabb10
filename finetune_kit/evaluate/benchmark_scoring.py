"""Multiple-choice scoring by forward passes only: LLaMA-Factory's letters, lm-evaluation-harness's log-likelihoods.

Prompts run in left-padded batches, longest first (the first batch shows at once whether memory
suffices, and similar lengths waste little padding). Position ids are counted from each row's
first real token, so a prompt scores the same in any batch, and only the logits of the last
positions are computed (``logits_to_keep``), not a vocabulary-wide row for every token.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from finetune_kit.evaluate.benchmark_data import CHOICES
from finetune_kit.models.adapters import unwrapped
from finetune_kit.models.decoding import pad_token_id

if TYPE_CHECKING:
    from finetune_kit.models.loaded import LoadedModel

Reduce = Callable[[int, Any], Any]


def letter_token_ids(tokenizer: Any) -> list[int]:
    """The token each letter is scored by: the last token of ``encode("A")``, as LLaMA-Factory takes it."""
    return [tokenizer.encode(letter, add_special_tokens=False)[-1] for letter in CHOICES]


def score_letters(lm: LoadedModel, prompts: Sequence[list[int]], *, batch_size: int, bar: Any) -> list[list[float]]:
    """LLaMA-Factory's scoring: softmax over the next-token logits of A, B, C and D after each prompt."""
    import torch

    ids = letter_token_ids(lm.tokenizer)

    def probabilities(_: int, logits: Any) -> list[float]:
        return [float(p) for p in torch.softmax(logits[-1, ids], dim=-1)]

    return forward_last(lm, prompts, [1] * len(prompts), probabilities, batch_size=batch_size, bar=bar)


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids as lm-evaluation-harness splits them.

    Trailing spaces of the context move to the continuation, the two are encoded together, and the
    continuation is what the joint encoding adds past the context's own tokens (no special tokens).
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx) :]


def score_loglikelihood(
    lm: LoadedModel,
    contexts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int,
    bar: Any,
) -> list[list[float]]:
    """lm-evaluation-harness's scoring: per context, the summed log-probability of each continuation.

    Each request runs ``(context + continuation)[:-1]``, cut from the left to the model's context
    length, as the harness does; requests whose inputs are equal (one-token continuations of one
    context) share a forward pass.
    """
    import torch

    limit = lm.context_length
    inputs: dict[tuple[int, ...], int] = {}
    targets: list[list[tuple[int, int, list[int]]]] = []  # per input: (question, choice, continuation ids)
    for q, context in enumerate(contexts):
        for c, continuation in enumerate(continuations):
            ctx, cont = encode_pair(lm.tokenizer, context, continuation)
            seq = (ctx + cont)[:-1]
            if limit is not None:
                seq = seq[-limit:]
            key = tuple(seq)
            if key not in inputs:
                inputs[key] = len(targets)
                targets.append([])
            targets[inputs[key]].append((q, c, cont))
    scores = [[0.0] * len(continuations) for _ in contexts]

    def gather(u: int, logits: Any) -> None:
        logprobs = torch.log_softmax(logits, dim=-1)
        width = logprobs.shape[0]
        for q, c, cont in targets[u]:
            rows = logprobs[width - len(cont) :]
            scores[q][c] = float(rows[torch.arange(len(cont)), torch.tensor(cont)].sum())

    sequences = [list(k) for k in inputs]
    keep = [max(len(cont) for _, _, cont in group) for group in targets]
    forward_last(lm, sequences, keep, gather, batch_size=batch_size, bar=bar)
    return scores


def forward_last(
    lm: LoadedModel,
    sequences: Sequence[list[int]],
    keep: Sequence[int],
    reduce: Reduce,
    *,
    batch_size: int,
    bar: Any,
) -> list[Any]:
    """``reduce(i, logits)`` for each sequence, given the float32 logits of its last ``keep[i]`` positions."""
    import torch

    model, device, pad = lm.model, lm.device, pad_token_id(lm)
    model.eval()
    extra = _logits_to_keep(model)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
    results: list[Any] = [None] * len(sequences)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in chunk)
        last = max(keep[i] for i in chunk)
        ids = torch.tensor([[pad] * (width - len(sequences[i])) + sequences[i] for i in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(sequences[i])) + [1] * len(sequences[i]) for i in chunk], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            kwargs = {extra: last} if extra else {}
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **kwargs)
            logits = out.logits[:, -last:, :].float()
            for row, i in enumerate(chunk):
                results[i] = reduce(i, logits[row, last - keep[i] :])
        bar.update(len(chunk))
    return results


def _logits_to_keep(model: Any) -> str | None:
    """The forward keyword that limits logits to the last positions, when the model has one."""
    inner = unwrapped(model)  # a PeftModel passes it on
    params = inspect.signature(inner.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return name
    return None
