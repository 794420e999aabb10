"""Choosing each sequence's next token in a shared decoding step, with per-request settings.

Every row of a batch may ask for something else: greedy or sampling (temperature, top-k, top-p
in that order, as ``transformers`` applies them), LLaMA-Factory's multiplicative
``repetition_penalty``, and OpenAI's request extras (:class:`SamplingExtras`):

- ``presence_penalty`` / ``frequency_penalty`` with their OpenAI meaning: the logit of every token
  already generated is lowered by ``presence_penalty`` once, plus ``frequency_penalty`` times the
  number of times it was generated (the prompt does not count);
- ``logit_bias``: a value added to a token's logit (-100 bans it, 100 forces it);
- ``seed``: a request's own random generator, so the same seed samples the same reply whatever
  else shares the batch.

Greedy rows with no adjustment are chosen with one ``argmax`` for the whole batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from finetune_kit.models.generation import GenerationConfig


@dataclass(frozen=True)
class SamplingExtras:
    """OpenAI request settings a :class:`~finetune_kit.models.generation.GenerationConfig` has no field for."""

    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name}: got {value}; expected a number from -2.0 to 2.0 (OpenAI's range)")
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise ValueError(f"logit_bias: {token!r} is not a token id; keys are token ids (integers, 0 or more)")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias[{token}]: got {bias}; expected a number from -100 to 100")

    def for_choice(self, index: int) -> SamplingExtras:
        """These extras for choice ``index`` of a request with several (``n``): a seeded request gives
        each choice its own seed (``seed + index``), so the choices differ from each other."""
        if index == 0 or self.seed is None:
            return self
        return replace(self, seed=self.seed + index)

    @property
    def penalizes(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


NO_EXTRAS = SamplingExtras()


class RowSampler:
    """One sequence's way of picking tokens: its settings and, when seeded, its own generator."""

    def __init__(self, gen: GenerationConfig, extras: SamplingExtras, device: Any) -> None:
        import torch

        self.gen, self.extras = gen, extras
        self.generator: torch.Generator | None = None
        if extras.seed is not None and not gen.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(extras.seed)
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if extras.logit_bias:
            ids = torch.tensor(list(extras.logit_bias), dtype=torch.long, device=device)
            self._bias = ids, torch.tensor(list(extras.logit_bias.values()), dtype=torch.float32, device=device)

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: nothing to adjust per row."""
        return (
            self.gen.greedy and self.gen.repetition_penalty == 1.0 and not self.extras.penalizes and self._bias is None
        )

    def adjust(self, logits: torch.Tensor, prompt: Sequence[int], generated: Sequence[int]) -> torch.Tensor:
        """This row's logits (1-D, float32) after the penalties and the bias."""
        import torch

        device = logits.device
        if self.gen.repetition_penalty != 1.0:
            seen = torch.tensor(sorted({*prompt, *generated}), dtype=torch.long, device=device)
            scores = logits[seen]
            penalty = self.gen.repetition_penalty
            logits[seen] = torch.where(scores < 0, scores * penalty, scores / penalty)
        if self.extras.penalizes and generated:
            ids, counts = torch.tensor(generated, dtype=torch.long, device=device).unique(return_counts=True)
            logits[ids] -= self.extras.presence_penalty + self.extras.frequency_penalty * counts.to(logits.dtype)
        if self._bias is not None:
            ids, values = self._bias
            keep = ids < logits.shape[-1]
            logits[ids[keep]] += values[keep]
        return logits

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from this row's adjusted logits."""
        import torch

        if self.gen.greedy:
            return int(logits.argmax())
        logits = logits / self.gen.temperature
        if 0 < self.gen.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.gen.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.gen.top_p < 1.0:
            ordered, order = torch.sort(logits, descending=False)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative <= 1 - self.gen.top_p
            drop[-1] = False  # always keep the most likely token
            logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def choose_tokens(
    logits: torch.Tensor,
    samplers: Sequence[RowSampler],
    prompts: Sequence[Sequence[int]],
    generated: Sequence[Sequence[int]],
) -> list[int]:
    """The next token of every row of ``logits`` ([batch, vocab]) under that row's sampler."""
    plain = [i for i, s in enumerate(samplers) if s.plain_greedy]
    picks: list[int] = [0] * len(samplers)
    if plain:
        best = logits[plain].argmax(-1).tolist() if len(plain) < len(samplers) else logits.argmax(-1).tolist()
        for i, token in zip(plain, best, strict=True):
            picks[i] = int(token)
    for i, sampler in enumerate(samplers):
        if not sampler.plain_greedy:
            row = sampler.adjust(logits[i].float().clone(), prompts[i], generated[i])
            picks[i] = sampler.pick(row)
    return picks
