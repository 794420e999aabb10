"""Prediction settings: LLaMA-Factory's ``do_predict`` keys, under the ``predict`` section."""

from __future__ import annotations

from dataclasses import dataclass

from finetune_kit.config.base import StageConfig, option


@dataclass(frozen=True, repr=False)
class PredictConfig(StageConfig):
    """How to run batch prediction on a dataset and where to write the results.

    Key names and defaults are LLaMA-Factory's, so a ``do_predict`` YAML maps one to one.
    Example::

        config = PredictConfig(per_device_eval_batch_size=4, max_samples=50, output_dir="saves/predict")
    """

    section = "predict"

    per_device_eval_batch_size: int = option(8, "Prompts generated together in one left-padded batch.")
    max_samples: int | None = option(None, "Predict only the first N examples (default: all).")
    output_dir: str | None = option(
        None, "Where generated_predictions.jsonl and predict_results.json go (default: nothing is written)."
    )
    overwrite_output_dir: bool = option(False, "Replace earlier predictions in output_dir.")
    predict_with_generate: bool = option(True, "Generate replies to score them (must be true, as in LLaMA-Factory).")

    def _check(self) -> list[str]:
        problems = []
        if self.per_device_eval_batch_size < 1:
            problems.append(
                f"per_device_eval_batch_size: got {self.per_device_eval_batch_size}; "
                "expected a positive integer such as 8"
            )
        if self.max_samples is not None and self.max_samples < 1:
            problems.append(f"max_samples: got {self.max_samples}; expected a positive integer, or none for all")
        if not self.predict_with_generate:
            problems.append(
                "predict_with_generate: got false; LLaMA-Factory requires predict_with_generate: true "
                "to save predictions. Fix: set it to true (or leave it out)"
            )
        if self.output_dir is not None and not self.output_dir.strip():
            problems.append("output_dir: got an empty string; expected a folder path, or none to write nothing")
        return problems
