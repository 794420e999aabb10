"""Which data to train on and how to cut it: LLaMA-Factory's data arguments."""

from __future__ import annotations

from dataclasses import dataclass

from finetune_kit.config.base import StageConfig, option


@dataclass(frozen=True, repr=False)
class DataConfig(StageConfig):
    """Dataset selection and tokenization limits (LLaMA-Factory key names)."""

    section = "data"

    dataset: tuple[str, ...] | None = option(None, "Training dataset names from dataset_info.json, comma separated.")
    eval_dataset: tuple[str, ...] | None = option(None, "Evaluation/prediction dataset names, comma separated.")
    dataset_dir: str = option("data", "Folder holding dataset_info.json and the data files.")
    cutoff_len: int = option(2048, "Most tokens per example after tokenization (prompt + reply).")
    max_samples: int | None = option(None, "Keep only the first N rows of each dataset.")
    val_size: float = option(0.0, "Held-out share (<1) or row count (>=1) of the training data for evaluation.")
    train_on_prompt: bool = option(False, "Also train on prompt tokens (default: replies only).")
    mask_history: bool = option(False, "Train only the last reply of multi-turn examples.")
    preprocessing_num_workers: int | None = option(None, "Accepted for compatibility; tokenization runs in-process.")
    overwrite_cache: bool = option(False, "Accepted for compatibility; tokenized data is not cached on disk.")
    packing: bool | None = option(None, "Sequence packing (not supported yet: must be false or unset).")
    streaming: bool = option(False, "Streaming datasets (not supported yet: must be false).")

    def _check(self) -> list[str]:
        problems = []
        if self.cutoff_len < 2:
            problems.append(f"cutoff_len: got {self.cutoff_len}; expected at least 2")
        if self.max_samples is not None and self.max_samples < 1:
            problems.append(f"max_samples: got {self.max_samples}; expected a positive row count")
        if self.val_size < 0:
            problems.append(f"val_size: got {self.val_size}; expected a fraction in [0, 1) or a row count")
        if self.mask_history and self.train_on_prompt:
            problems.append("mask_history and train_on_prompt cannot both be true; pick one")
        if self.packing:
            problems.append("packing: true is not supported yet. Fix: remove it or set packing: false")
        if self.streaming:
            problems.append("streaming: true is not supported yet. Fix: remove it or set streaming: false")
        return problems
