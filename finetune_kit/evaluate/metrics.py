"""ROUGE-1/2/L and BLEU-4 computed exactly as LLaMA-Factory's ``ComputeSimilarity``.

The recipe (shared with ChatGLM-6B/2-6B, so scores are comparable with theirs):

* ROUGE is **word-level**: both texts are segmented with ``jieba.cut`` (HMM on, precise
  mode), joined with spaces and scored with ``rouge_chinese.Rouge``; the F-score is used.
  When either side has no tokens after segmentation, all three ROUGE scores are 0.
* BLEU-4 is **character-level**: ``nltk`` ``sentence_bleu([list(label)], list(pred))`` with
  uniform 4-gram weights and ``SmoothingFunction().method3`` (not method4).
* Every per-example score is ×100 and rounded to 4 decimals; the reported score is the mean
  of the per-example scores (not corpus BLEU), also rounded to 4 decimals.

Example::

    generation_scores(["我们包邮"], ["我们全国包邮哦"])
    # {'rouge-1': 66.6667, 'rouge-2': 0.0, 'rouge-l': 66.6667, 'bleu-4': ...}
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from finetune_kit.errors import MissingDependencyError

SCORE_KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
_PURPOSE = "ROUGE/BLEU scoring of predictions"


class _Backend(NamedTuple):
    cut: Callable[[str], Any]
    rouge: Any
    bleu: Callable[..., float]
    smoothing: Any


@functools.lru_cache(maxsize=1)
def _backend() -> _Backend:
    """Import jieba, rouge-chinese and nltk once; jieba's dictionary is loaded quietly."""
    try:
        import jieba
    except ImportError as exc:
        raise MissingDependencyError("jieba", purpose=_PURPOSE, extra="metrics") from exc
    try:
        from rouge_chinese import Rouge
    except ImportError as exc:
        raise MissingDependencyError("rouge-chinese", purpose=_PURPOSE, extra="metrics") from exc
    try:
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    except ImportError as exc:
        raise MissingDependencyError("nltk", purpose=_PURPOSE, extra="metrics") from exc

    jieba.setLogLevel(logging.CRITICAL)  # as LLaMA-Factory's eval script: no "Building prefix dict" noise
    jieba.initialize()
    return _Backend(cut=jieba.cut, rouge=Rouge(), bleu=sentence_bleu, smoothing=SmoothingFunction().method3)


def require_metrics() -> None:
    """Raise :class:`MissingDependencyError` now if a scoring package is missing.

    Called before generation starts, so a missing package does not surface after a long run.
    """
    _backend()


def example_scores(prediction: str, label: str) -> dict[str, float]:
    """The four scores (×100, 4 decimals) of one prediction against its reference."""
    backend = _backend()
    hypothesis = " ".join(backend.cut(prediction))
    reference = " ".join(backend.cut(label))
    scores = dict.fromkeys(("rouge-1", "rouge-2", "rouge-l"), 0.0)
    if hypothesis.split() and reference.split():
        try:
            result = backend.rouge.get_scores(hypothesis, reference)[0]
        except ValueError:  # rouge's "Hypothesis is empty."-style errors; LF would crash, score 0 instead
            result = {}
        for key in scores:
            if key in result:
                scores[key] = round(result[key]["f"] * 100, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns on every short hypothesis with no n-gram overlap
        bleu = backend.bleu([list(label)], list(prediction), smoothing_function=backend.smoothing)
    scores["bleu-4"] = round(float(bleu) * 100, 4)
    return scores


def per_example_scores(predictions: Sequence[str], labels: Sequence[str]) -> list[dict[str, float]]:
    """:func:`example_scores` for each pair, in order (for reports and finding the worst answers)."""
    _check_lengths(predictions, labels)
    return [example_scores(p, r) for p, r in zip(predictions, labels, strict=True)]


def mean_scores(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Average per-example scores key by key, rounded to 4 decimals."""
    if not rows:
        raise ValueError("no scores to average: got 0 examples")
    return {key: round(sum(row[key] for row in rows) / len(rows), 4) for key in SCORE_KEYS}


def generation_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F and character BLEU-4 (×100), as LLaMA-Factory's ``predict_*`` metrics.

    Example::

        >>> generation_scores(["我们包邮"], ["我们全国包邮哦"])["rouge-1"]
        66.6667
    """
    return mean_scores(per_example_scores(predictions, labels))


def _check_lengths(predictions: Sequence[str], labels: Sequence[str]) -> None:
    if isinstance(predictions, str) or isinstance(labels, str):
        raise TypeError(
            "predictions and labels must be sequences of strings, not a single string; "
            "wrap it in a list: generation_scores([pred], [label])"
        )
    if len(predictions) != len(labels):
        raise ValueError(f"got {len(predictions)} predictions but {len(labels)} labels; they must pair up one to one")
