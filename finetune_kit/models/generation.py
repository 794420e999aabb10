"""Generation settings (LLaMA-Factory's generating arguments) and the library's one default.

The rule, stated once: **in Python, decoding is greedy unless you ask for sampling**
(:data:`DEFAULT_GENERATION`: ``do_sample=False``, up to 1024 new tokens) — ``LoadedModel.chat/
generate/stream``, ``Server`` and ``Evaluator`` (which also caps replies at 128 tokens) all start
from it, so the same call gives the same answer twice. The **CLI** keeps LLaMA-Factory's
defaults, which are :class:`GenerationConfig`'s field defaults (sampling, temperature 0.95,
top_p 0.7), so a YAML means what it meant under ``llamafactory-cli``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

from finetune_kit.config.base import StageConfig, option


@dataclass(frozen=True, repr=False)
class GenerationConfig(StageConfig):
    """Decoding settings; defaults are LLaMA-Factory's (sampling, temperature 0.95, top_p 0.7)."""

    section = "generation"

    do_sample: bool = option(True, "Sample; false means greedy decoding.")
    temperature: float = option(0.95, "Sampling temperature; 0 means greedy.")
    top_p: float = option(0.7, "Nucleus sampling mass.")
    top_k: int = option(50, "Sample among the k most likely tokens.")
    num_beams: int = option(1, "Beam search width (1 = none).")
    max_new_tokens: int = option(1024, "Most tokens to generate per reply.")
    repetition_penalty: float = option(1.0, "Multiplicative repetition penalty (1.0 = none).")
    length_penalty: float = option(1.0, "Beam-search length penalty.")
    skip_special_tokens: bool = option(True, "Drop special tokens from decoded text.")

    def _check(self) -> list[str]:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens: got {self.max_new_tokens}; expected at least 1")
        if self.temperature < 0:
            problems.append(f"temperature: got {self.temperature}; expected 0 or more")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p: got {self.top_p}; expected a value in (0, 1]")
        if self.num_beams < 1:
            problems.append(f"num_beams: got {self.num_beams}; expected at least 1")
        return problems

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def to_hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate``."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "num_beams": self.num_beams,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.num_beams > 1:
            kwargs["length_penalty"] = self.length_penalty
        if self.greedy:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


class GenerationOverrides(TypedDict, total=False):
    """The keyword overrides ``chat``/``generate``/``stream`` accept: :class:`GenerationConfig`'s fields."""

    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    num_beams: int
    max_new_tokens: int
    repetition_penalty: float
    length_penalty: float
    skip_special_tokens: bool


DEFAULT_GENERATION = GenerationConfig(do_sample=False)
"""The Python API's default decoding: greedy, up to 1024 new tokens."""

GREEDY = DEFAULT_GENERATION


def resolve_generation(generation: GenerationConfig | None, overrides: GenerationOverrides) -> GenerationConfig:
    """``generation`` (default :data:`DEFAULT_GENERATION`) with keyword ``overrides`` applied and checked."""
    if generation is not None and not isinstance(generation, GenerationConfig):
        raise TypeError(
            f"generation must be a GenerationConfig, got {type(generation).__name__}; pass single "
            "settings as keywords instead, e.g. max_new_tokens=64"
        )
    base = generation if generation is not None else DEFAULT_GENERATION
    return base.with_(**overrides) if overrides else base
