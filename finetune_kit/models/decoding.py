"""Hugging Face decoding for a :class:`LoadedModel`: batched generation, streaming and stop strings.

This is the engine behind ``LoadedModel.generate/stream/chat`` and, on raw text without the chat
template, ``LoadedModel.complete/stream_text``; another backend replaces this
module's role by satisfying :class:`finetune_kit.models.engine.Engine`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from finetune_kit.data.template import Message
from finetune_kit.models.detok import IncrementalText, cut_at_stop
from finetune_kit.models.engine import Completion, FinishReason
from finetune_kit.models.generation import GenerationConfig

if TYPE_CHECKING:
    from finetune_kit.models.loaded import LoadedModel


def as_messages(messages: str | Sequence[Message], system: str | None = None) -> list[Message]:
    """A user string becomes one user turn; ``system`` is prepended unless the conversation has one."""
    msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else [dict(m) for m in messages]
    if system is not None and not (msgs and msgs[0]["role"] == "system"):
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def generate(
    lm: LoadedModel,
    conversations: Sequence[Sequence[Message]],
    gen: GenerationConfig,
    *,
    batch_size: int,
    stop: Sequence[str],
) -> list[Completion]:
    """Replies for many conversations, in left-padded batches of ``batch_size``."""
    return generate_ids(lm, [lm.encode_prompt(c) for c in conversations], gen, batch_size=batch_size, stop=stop)


def generate_ids(
    lm: LoadedModel,
    prompts: Sequence[list[int]],
    gen: GenerationConfig,
    *,
    batch_size: int,
    stop: Sequence[str],
) -> list[Completion]:
    """Continuations of many prompts given as token ids (a chat prompt or raw text), in left-padded batches."""
    results: list[Completion] = []
    for start in range(0, len(prompts), batch_size):
        results += generate_batch(lm, prompts[start : start + batch_size], gen, stop=stop)
    return results


def generate_batch(
    lm: LoadedModel,
    prompts: Sequence[list[int]],
    gen: GenerationConfig,
    *,
    stop: Sequence[str],
    width: int | None = None,
    **generate_kwargs: Any,
) -> list[Completion]:
    """One left-padded ``generate`` call over ``prompts``: padded to ``width`` (default: the longest
    prompt), ``generate_kwargs`` passed on to transformers (``cache_implementation``...)."""
    import torch

    pad_id = pad_token_id(lm)
    width = width if width is not None else max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=lm.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=lm.device)
    lm.model.eval()
    with torch.inference_mode():
        out = lm.model.generate(
            input_ids=ids,
            attention_mask=mask,
            pad_token_id=pad_id,
            eos_token_id=lm.stop_token_ids,
            **_stop_kwargs(lm, stop),
            **gen.to_hf_kwargs(),
            **generate_kwargs,
        )
    return [finish(lm, row, len(p), gen, stop) for row, p in zip(out[:, width:].tolist(), prompts, strict=True)]


def stream(
    lm: LoadedModel, messages: Sequence[Message], gen: GenerationConfig, *, stop: Sequence[str]
) -> Iterator[str | Completion]:
    """Text pieces as they are generated, then one final :class:`Completion`.

    A tail that could be the start of a stop string (or half of a multi-byte character) is held
    back until the next piece shows what it is, so no stop string ever reaches the caller.
    """
    yield from stream_ids(lm, lm.encode_prompt(messages), gen, stop=stop)


def stream_ids(
    lm: LoadedModel, prompt: list[int], gen: GenerationConfig, *, stop: Sequence[str]
) -> Iterator[str | Completion]:
    """:func:`stream` for a prompt given as token ids (a chat prompt or raw text)."""
    import torch

    tokens = _TokenQueue()
    holder: dict[str, Any] = {}
    ids = torch.tensor([prompt], device=lm.device)

    def run() -> None:
        try:
            with torch.inference_mode():
                holder["out"] = lm.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    streamer=tokens,
                    pad_token_id=pad_token_id(lm),
                    eos_token_id=lm.stop_token_ids,
                    **_stop_kwargs(lm, stop),
                    **gen.to_hf_kwargs(),
                )
        except BaseException as exc:  # re-raised in the consuming thread
            holder["error"] = exc
            tokens.end()

    lm.model.eval()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text = IncrementalText(lm.tokenizer, skip_special_tokens=gen.skip_special_tokens, stop=stop)
    for token in tokens:
        piece = text.push(token)
        if piece:
            yield piece
        if text.stopped:
            break
    if text.stopped:  # drain after a stop string so the generation thread can finish
        for _ in tokens:
            pass
    thread.join()
    if "error" in holder:
        raise holder["error"]
    row = holder["out"][0, len(prompt) :].tolist()
    final = finish(lm, row, len(prompt), gen, stop)
    rest = "" if text.stopped else text.rest(final.text)
    if rest:
        yield rest
    yield final


class _TokenQueue:
    """A ``generate`` streamer that hands the generated token ids (not the prompt's) to another thread."""

    def __init__(self) -> None:
        self._queue: queue.Queue[list[int] | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate puts the prompt first
            self._prompt_seen = True
            return
        self._queue.put([int(t) for t in value.reshape(-1).tolist()])

    def end(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[int]:
        while (chunk := self._queue.get()) is not None:
            yield from chunk


def pad_token_id(lm: LoadedModel) -> int:
    pad = lm.tokenizer.pad_token_id
    return pad if pad is not None else lm.stop_token_ids[0]


def finish(lm: LoadedModel, row: list[int], n_prompt: int, gen: GenerationConfig, stop: Sequence[str]) -> Completion:
    """Cut a generated row at the first stop token or stop string, decode it and say why it ended."""
    stops = set(lm.stop_token_ids)
    pad = lm.tokenizer.pad_token_id
    tokens: list[int] = []
    reason: FinishReason = "length"
    for tid in row:
        if tid in stops:
            reason = "stop"
            break
        tokens.append(tid)
    if reason == "length" and pad is not None and pad not in stops:
        while tokens and tokens[-1] == pad:
            tokens.pop()
    text = lm.tokenizer.decode(tokens, skip_special_tokens=gen.skip_special_tokens)
    if reason == "length":
        text = text.rstrip("\ufffd")  # the token limit split a multi-byte character
    cut = cut_at_stop(text, stop)
    if cut is not None:
        text, reason = text[:cut], "stop"
    return Completion(text=text, prompt_tokens=n_prompt, completion_tokens=len(tokens), finish_reason=reason)


def _stop_kwargs(lm: LoadedModel, stop: Sequence[str]) -> dict[str, Any]:
    return {"stop_strings": list(stop), "tokenizer": lm.tokenizer} if stop else {}
