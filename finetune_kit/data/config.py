"""Data settings, in two parts: which data (the registry and CLI) and how it is encoded (the trainer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from finetune_kit.config.base import StageConfig, option


@dataclass(frozen=True, repr=False)
class DataConfig(StageConfig):
    """Which datasets to read and how to split them (LLaMA-Factory key names).

    Used by :class:`DatasetRegistry` calls and the CLI; the trainer never sees it. In Python::

        registry = DatasetRegistry.from_dir(cfg.dataset_dir)
        train, val = registry.load(cfg.dataset, max_samples=cfg.max_samples).split(cfg.val_size)
    """

    section = "data"

    dataset: tuple[str, ...] | None = option(None, "Training dataset names from dataset_info.json, comma separated.")
    eval_dataset: tuple[str, ...] | None = option(None, "Evaluation/prediction dataset names, comma separated.")
    dataset_dir: str = option("data", "Folder holding dataset_info.json and the data files.")
    max_samples: int | None = option(None, "Keep only the first N rows of each dataset.")
    val_size: float = option(0.0, "Held-out share (<1) or row count (>=1) of the training data for evaluation.")
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = option(
        "concat",
        "How several datasets are joined: concat, interleave_under (until the first runs out) or "
        "interleave_over (until all have, repeating the shorter ones).",
    )
    interleave_probs: tuple[float, ...] | None = option(
        None, "Sampling probabilities of the datasets for interleave_*, comma separated, summing to 1."
    )
    streaming: bool = option(
        False, "Read the data lazily as training consumes it (files bigger than memory); needs max_steps."
    )
    buffer_size: int = option(16384, "Shuffle buffer, in examples, of streamed data.")
    skip_invalid: bool = option(
        False, "Drop malformed rows (their count and places are printed) instead of stopping with the list of them."
    )

    def _check(self) -> list[str]:
        problems = []
        if self.max_samples is not None and self.max_samples < 1:
            problems.append(f"max_samples: got {self.max_samples}; expected a positive row count")
        if self.interleave_probs is not None and self.mix_strategy == "concat":
            problems.append("interleave_probs needs mix_strategy: interleave_under or interleave_over")
        if self.buffer_size < 1:
            problems.append(f"buffer_size: got {self.buffer_size}; expected a positive example count")
        if self.streaming and self.val_size:
            problems.append("val_size cannot split streamed data. Fix: set eval_dataset to a held-out dataset instead")
        if self.val_size < 0:
            problems.append(f"val_size: got {self.val_size}; expected a fraction in [0, 1) or a row count")
        return problems


@dataclass(frozen=True, repr=False)
class EncodingConfig(StageConfig):
    """How conversations become training tokens; owned by the trainer (``LoraTrainer.with_data``)."""

    section = "encoding"

    cutoff_len: int = option(2048, "Most tokens per example after tokenization (prompt + reply).")
    train_on_prompt: bool = option(False, "Also train on prompt tokens (default: replies only).")
    mask_history: bool = option(False, "Train only the last reply of multi-turn examples.")
    preprocessing_num_workers: int | None = option(
        None, "Processes that tokenize in parallel (none: one); the result is the same for any number."
    )
    tokenized_path: str | None = option(
        None, "Folder of tokenized training data: loaded if it exists (also one LLaMA-Factory saved), else written."
    )
    overwrite_cache: bool = option(
        False, "Tokenize again instead of reusing the on-disk cache of earlier tokenizations."
    )
    packing: bool | None = option(
        None,
        "Pack several whole examples into each row of at most cutoff_len tokens, padding-free: positions restart "
        "and attention stays inside each example, so the loss equals unpacked training (sft; fewer, fuller "
        "rows per step). pt packs by default by joining texts into blocks (LLaMA-Factory's); none = that default.",
    )
    neat_packing: bool = option(
        False,
        "Packing where no example attends to another (implies packing). sft: the same as packing; pt: whole texts "
        "packed instead of joined into blocks.",
    )

    def _check(self) -> list[str]:
        problems = []
        if self.cutoff_len < 2:
            problems.append(f"cutoff_len: got {self.cutoff_len}; expected at least 2")
        if self.preprocessing_num_workers is not None and self.preprocessing_num_workers < 1:
            problems.append(
                f"preprocessing_num_workers: got {self.preprocessing_num_workers}; expected a positive process count"
            )
        if self.mask_history and self.train_on_prompt:
            problems.append("mask_history and train_on_prompt cannot both be true; pick one")
        return problems
