"""EvalReport: the scores and predictions of one prediction run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from finetune_kit.evaluate.metrics import SCORE_KEYS, per_example_scores


@dataclass(frozen=True)
class EvalReport:
    """Scores and predictions of one :meth:`Evaluator.predict` run.

    ``scores`` has the keys ``rouge-1``, ``rouge-2``, ``rouge-l`` and ``bleu-4`` (×100, the mean
    of per-example scores, as LLaMA-Factory's ``predict_*`` metrics). ``records`` holds one
    ``{"prompt", "predict", "label"}`` dict per example, as in ``generated_predictions.jsonl``.
    """

    scores: dict[str, float]
    records: tuple[dict[str, str], ...] = field(repr=False)
    output_dir: Path | None
    num_samples: int
    runtime_s: float

    def __repr__(self) -> str:
        scores = ", ".join(f"{k}={self.scores.get(k, float('nan')):.2f}" for k in SCORE_KEYS)
        where = f", output_dir='{self.output_dir}'" if self.output_dir is not None else ""
        return f"EvalReport({self.num_samples} samples, {scores}, {self.runtime_s:.1f}s{where})"

    def table(self) -> str:
        """The scores as an aligned two-column table."""
        lines = [f"{'metric':<8} {'score':>9}"]
        lines += [f"{k:<8} {self.scores[k]:>9.4f}" for k in SCORE_KEYS]
        lines.append(f"{self.num_samples} samples in {self.runtime_s:.1f}s")
        return "\n".join(lines)

    def compare(self, before: EvalReport) -> str:
        """A before/after/delta table of the scores, e.g. base model vs. fine-tuned.

        Example::

            before = Evaluator(base).predict(test)
            after = Evaluator(result).predict(test)
            print(after.compare(before))
        """
        if not isinstance(before, EvalReport):
            raise TypeError(f"compare() takes the EvalReport to compare against, got {type(before).__name__}")
        lines = [f"{'metric':<8} {'before':>9} {'after':>9} {'delta':>9}"]
        for k in SCORE_KEYS:
            old, new = before.scores[k], self.scores[k]
            lines.append(f"{k:<8} {old:>9.4f} {new:>9.4f} {new - old:>+9.4f}")
        if before.num_samples != self.num_samples:
            lines.append(
                f"note: different sample counts (before {before.num_samples}, after {self.num_samples}); "
                "the scores are not directly comparable"
            )
        return "\n".join(lines)

    def example_scores(self) -> list[dict[str, float]]:
        """Per-example scores, in the order of :attr:`records` (to find the worst answers)."""
        return per_example_scores([r["predict"] for r in self.records], [r["label"] for r in self.records])
