"""Evaluation settings: LLaMA-Factory's ``do_predict`` keys (``predict``) and its benchmark keys (``benchmark``)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from finetune_kit.config.base import StageConfig, option
from finetune_kit.errors import ConfigError, did_you_mean
from finetune_kit.evaluate.benchmark_data import resolve_task

DEMO_QUIZ = Path(__file__).parents[1] / "data" / "demo" / "mmlu_mini"
"""The shipped general-knowledge quiz in MMLU's layout (``BenchmarkConfig.demo()``)."""

PredictBackend = Literal["auto", "continuous", "static_compiled"]
"""How :meth:`Evaluator.predict` decodes with a LoadedModel (``PredictConfig.predict_backend``)."""


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
    predict_backend: PredictBackend = option(
        "auto",
        "static_compiled: same-shape batches on a static KV cache, compiled on CUDA (fast on a GPU; "
        "the first batch compiles); continuous: one continuous batch; auto: static_compiled on CUDA, "
        "else continuous.",
    )

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


@dataclass(frozen=True, repr=False)
class BenchmarkConfig(StageConfig):
    """Which benchmark to score and how: the keys of LLaMA-Factory's ``llamafactory-cli eval``.

    ``task`` is LLaMA-Factory's ``<benchmark>_<split>`` (``mmlu_test``, ``cmmlu_test``,
    ``ceval_validation``) or a bare benchmark name, which takes that benchmark's usual split.
    ``scoring`` is ours: ``letter`` is LLaMA-Factory's recipe, ``loglikelihood`` lm-evaluation-harness's.
    ``compare`` (ours, ``finetune-kit eval --compare ADAPTER``) asks for a before/after run instead:
    the model without and with that adapter, on the benchmark and/or ``eval_dataset``. Example::

        config = BenchmarkConfig(task="mmlu_test", task_dir="data/mmlu", n_shot=5, save_dir="saves/mmlu")
    """

    section = "benchmark"

    task: str | None = option(
        None, "Benchmark and split: mmlu_test, cmmlu_test or ceval_validation (mmlu, cmmlu, ceval: the usual split)."
    )
    task_dir: str = option(
        "evaluation", "Folder with the benchmark's CSV files in its released layout (or with mmlu/, cmmlu/, ceval/)."
    )
    lang: Literal["en", "zh"] | None = option(
        None, "Prompt wording, en or zh (default: the benchmark's own: en for mmlu, zh for cmmlu and ceval)."
    )
    n_shot: int = option(5, "Solved dev-split questions shown before each question.")
    batch_size: int = option(8, "Questions scored together in one left-padded forward pass.")
    seed: int = option(42, "Seed of the exemplar draws of letter scoring (LLaMA-Factory's shuffle).")
    save_dir: str | None = option(
        None, "Folder for results.json and results.log; must be new or empty (default: nothing is written)."
    )
    scoring: Literal["letter", "loglikelihood"] = option(
        "letter", "letter: LLaMA-Factory's (next-token A/B/C/D); loglikelihood: lm-evaluation-harness's."
    )
    subjects: tuple[str, ...] | None = option(
        None, "Score only these subjects, comma separated (default: every subject file in task_dir)."
    )
    compare: str | None = option(
        None,
        "Adapter folder: score the model without and with it on task and/or eval_dataset, and write "
        "comparison.md and comparison.png into save_dir (or output_dir).",
    )

    @classmethod
    def demo(cls, **changes: object) -> BenchmarkConfig:
        """The shipped general-knowledge quiz ``mmlu_mini`` as ``mmlu_test``: 6 subjects, 90 test questions.

        Original questions in MMLU's released layout (not MMLU, and its scores are not MMLU scores),
        for a quick before/after check that fine-tuning did not break what a model knew. ``changes``
        set other fields, e.g. ``BenchmarkConfig.demo(n_shot=0)``.
        """
        return cls(task="mmlu_test", task_dir=str(DEMO_QUIZ), **changes)  # type: ignore[arg-type]

    def _check(self) -> list[str]:
        problems = []
        if self.n_shot < 0:
            problems.append(f"n_shot: got {self.n_shot}; expected 0 or more (5 is the usual)")
        if self.batch_size < 1:
            problems.append(f"batch_size: got {self.batch_size}; expected a positive integer such as 8")
        if self.compare is not None and not self.compare.strip():
            problems.append("compare: got an empty string; expected the adapter folder to compare against")
        if self.save_dir is not None and not self.save_dir.strip():
            problems.append("save_dir: got an empty string; expected a folder path, or none to write nothing")
        if self.task is not None:
            try:
                spec, _ = resolve_task(self.task, None)
            except ConfigError as exc:
                problems += exc.problems
            else:
                for subject in [s for s in self.subjects or () if s not in spec.subjects]:
                    hint = did_you_mean(subject, spec.subjects)
                    problems.append(f"subjects: {subject!r} is not a {spec.title} subject.{hint}")
        return problems

    def unused_keys(self) -> list[str]:
        """Keys set away from their defaults although no ``task`` asks for a benchmark."""
        if self.task is not None:
            return []
        defaults = BenchmarkConfig()
        own = [f.name for f in fields(self) if f.name != "compare"]  # compare also works on eval_dataset alone
        if self.compare is not None:
            own.remove("save_dir")  # where the comparison goes
        return [name for name in own if getattr(self, name) != getattr(defaults, name)]
