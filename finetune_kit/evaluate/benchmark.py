"""Benchmarks: MMLU, CMMLU and C-Eval few-shot accuracy, scored as LLaMA-Factory or lm-evaluation-harness scores it.

:func:`run_benchmark` reads a benchmark's released CSV files (``benchmark_data``), builds one prompt
per question, scores it with forward passes only (``benchmark_scoring``) and returns a
:class:`BenchmarkResult`: per-subject, per-category and average accuracy, ×100 as LLaMA-Factory
prints them, with every question's prediction. ``Evaluator.benchmark`` is the public entry.

Two recipes, each reproducing its tool whole:

* ``letter`` (LLaMA-Factory's ``llamafactory-cli eval``): the question and its exemplars as chat
  turns of the model's template (LLaMA-Factory's tutorial uses ``template: fewshot``), the
  exemplars drawn per question from the shuffled dev split, then a softmax over the next-token
  logits of ``A``, ``B``, ``C``, ``D``.
* ``loglikelihood`` (lm-evaluation-harness's ``mmlu``, ``cmmlu``, ``ceval-valid`` tasks): one raw
  text with the first ``n_shot`` dev questions, and the choice whose continuation (``" A"``...)
  has the highest log-likelihood.
"""

from __future__ import annotations

import html
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_kit._artifacts import BENCHMARK_LOG, BENCHMARK_RECORD, BENCHMARK_RESULTS, provenance, write_record
from finetune_kit._fs import write_json, write_text
from finetune_kit.data.templates import get_template
from finetune_kit.errors import OutputExistsError
from finetune_kit.evaluate import benchmark_scoring as scoring
from finetune_kit.evaluate.benchmark_data import (
    CHOICES,
    SPECS,
    LfShuffler,
    Question,
    find_subjects,
    harness_context,
    lf_messages,
    locate,
    read_questions,
    resolve_task,
)
from finetune_kit.evaluate.config import BenchmarkConfig
from finetune_kit.evaluate.subjects import CATEGORIES

if TYPE_CHECKING:
    from finetune_kit.models.loaded import LoadedModel

AVERAGE = "Average"


@dataclass(frozen=True)
class BenchmarkPrediction:
    """One question's outcome: its subject and row, the gold letter, the chosen one and the four scores.

    ``scores`` are the softmax probabilities of A-D (letter scoring) or the log-likelihoods of the
    four continuations (loglikelihood scoring).
    """

    subject: str
    index: int
    answer: str
    prediction: str
    scores: tuple[float, ...]

    @property
    def correct(self) -> bool:
        return self.prediction == self.answer


@dataclass(frozen=True)
class BenchmarkResult:
    """The accuracy of one benchmark run, ×100 as LLaMA-Factory reports it.

    ``accuracy`` is the average over all questions; ``categories`` (STEM, Social Sciences,
    Humanities, Other) and ``subjects`` hold the same over their questions; ``counts`` gives the
    number of questions behind every key of both, and behind ``"Average"``. Example::

        result = Evaluator(model).benchmark("mmlu_test", task_dir="data/mmlu", n_shot=5)
        print(result.format())
        result.save("saves/mmlu")     # results.json, results.log
    """

    task: str
    split: str
    n_shot: int
    scoring: str
    lang: str
    accuracy: float
    categories: dict[str, float]
    subjects: dict[str, float]
    counts: dict[str, int]
    predictions: tuple[BenchmarkPrediction, ...] = field(repr=False)
    runtime_s: float = 0.0
    save_dir: Path | None = None
    record: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_predictions(cls, predictions: list[BenchmarkPrediction], *, task: str, **fields: Any) -> BenchmarkResult:
        """Aggregate predictions: each subject's and category's share of correct answers, and the average."""
        groups: dict[str, list[bool]] = {AVERAGE: [p.correct for p in predictions]}
        by_subject: dict[str, list[bool]] = {}
        for p in predictions:
            by_subject.setdefault(p.subject, []).append(p.correct)
            groups.setdefault(SPECS[task].subjects[p.subject][1], []).append(p.correct)
        percent = {key: 100.0 * sum(v) / len(v) for key, v in {**groups, **by_subject}.items()}
        return cls(
            accuracy=percent[AVERAGE],
            categories={c: percent[c] for c in CATEGORIES if c in groups},
            subjects={s: percent[s] for s in by_subject},
            counts={k: len(v) for k, v in {**groups, **by_subject}.items()},
            predictions=tuple(predictions),
            task=task,
            **fields,
        )

    def __repr__(self) -> str:
        cats = "".join(f", {c}={v:.2f}" for c, v in self.categories.items())
        where = f", save_dir='{self.save_dir}'" if self.save_dir is not None else ""
        return (
            f"BenchmarkResult({self.task}_{self.split}, {self.n_shot}-shot, {self.scoring}, "
            f"accuracy={self.accuracy:.2f}{cats}, {self.counts[AVERAGE]} questions{where})"
        )

    def summary(self) -> str:
        """LLaMA-Factory's score lines: ``Average`` and each category, right-aligned, 2 decimals."""
        rows = {AVERAGE: self.accuracy, **self.categories}
        return "\n".join(f"{name:>15}: {value:.2f}" for name, value in rows.items())

    def format(self) -> str:
        """:meth:`summary`, then what was run and a per-subject table (what ``results.log`` holds)."""
        width = max(len(s) for s in [*self.subjects, "subject"])
        plural = "subject" if len(self.subjects) == 1 else "subjects"
        lines = [
            self.summary(),
            "",
            f"{self.task}_{self.split}: {self.n_shot}-shot, {self.scoring} scoring, lang {self.lang}, "
            f"{self.counts[AVERAGE]} questions in {len(self.subjects)} {plural}, {self.runtime_s:.1f}s",
            f"{'subject':<{width}}  {'category':<15}  {'questions':>9}  {'accuracy':>8}",
        ]
        for subject, value in self.subjects.items():
            category = SPECS[self.task].subjects[subject][1]
            lines.append(f"{subject:<{width}}  {category:<15}  {self.counts[subject]:>9}  {value:>8.2f}")
        return "\n".join(lines)

    def _rows(self) -> list[tuple[str, float, int]]:
        keys = [AVERAGE, *self.categories, *self.subjects]
        values = {AVERAGE: self.accuracy, **self.categories, **self.subjects}
        return [(key, values[key], self.counts[key]) for key in keys]

    def _repr_markdown_(self) -> str:
        head = f"**{self.task}_{self.split}**, {self.n_shot}-shot, {self.scoring} scoring\n\n"
        table = ["| | accuracy | questions |", "|---|---:|---:|"]
        table += [f"| {k} | {v:.2f} | {n} |" for k, v, n in self._rows()]
        return head + "\n".join(table)

    def _repr_html_(self) -> str:
        cells = "".join(
            f"<tr><td>{html.escape(k)}</td><td style='text-align:right'>{v:.2f}</td>"
            f"<td style='text-align:right'>{n}</td></tr>"
            for k, v, n in self._rows()
        )
        return (
            f"<b>{html.escape(self.task)}_{html.escape(self.split)}</b>, {self.n_shot}-shot, "
            f"{html.escape(self.scoring)} scoring<table><tr><th></th><th>accuracy</th><th>questions</th></tr>"
            f"{cells}</table>"
        )

    def results_json(self) -> dict[str, dict[str, str]]:
        """LLaMA-Factory's ``results.json`` content: per subject, each question's position -> predicted letter."""
        out: dict[str, dict[str, str]] = {}
        for p in self.predictions:
            answers = out.setdefault(p.subject, {})
            answers[str(len(answers))] = p.prediction
        return out

    def to_dict(self) -> dict[str, Any]:
        """The scores and settings as plain JSON values (without the per-question predictions)."""
        keys = ("task", "split", "n_shot", "scoring", "lang", "accuracy", "categories", "subjects", "counts")
        return {k: getattr(self, k) for k in keys} | {"runtime_s": round(self.runtime_s, 3)}

    def save(self, save_dir: str | os.PathLike[str]) -> Path:
        """Write ``results.json``, ``results.log`` and the provenance record into ``save_dir``.

        ``save_dir`` must not exist yet or be empty (LLaMA-Factory refuses an existing one); an
        earlier run's results are never overwritten. Returns the folder.
        """
        out = Path(save_dir)
        check_save_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / BENCHMARK_RESULTS, self.results_json())
        write_text(out / BENCHMARK_LOG, self.format() + "\n")
        write_record(out, BENCHMARK_RECORD, {**self.record, "scores": self.to_dict(), "predictions": self._details()})
        return out

    def _details(self) -> list[dict[str, Any]]:
        return [asdict(p) | {"correct": p.correct} for p in self.predictions]


def check_save_dir(save_dir: Path) -> None:
    """Refuse a ``save_dir`` that holds anything already (LLaMA-Factory's eval refused any existing one)."""
    if save_dir.exists() and (not save_dir.is_dir() or any(save_dir.iterdir())):
        raise OutputExistsError(
            f"save_dir {str(save_dir)!r} already exists and is not empty (an earlier run's results?); refusing to "
            "write into it. Fix: pass a new save_dir, or move that folder away"
        )


def run_benchmark(
    lm: LoadedModel, config: BenchmarkConfig, *, template: str | None = None, progress: bool = True
) -> BenchmarkResult:
    """Score ``lm`` on ``config.task``; everything about the data is checked before the first forward pass."""
    from tqdm.auto import tqdm

    if config.task is None:
        raise ValueError("run_benchmark needs config.task")
    spec, split = resolve_task(config.task, None)
    lang = config.lang or spec.language
    out = Path(config.save_dir) if config.save_dir is not None else None
    if out is not None:
        check_save_dir(out)
    root = locate(spec, config.task_dir, spec.folders[split])
    subjects = find_subjects(spec, root, spec.folders[split], config.subjects)
    questions = {s: read_questions(spec, root, spec.folders[split], s) for s in subjects}
    dev = {s: read_questions(spec, root, "dev", s) if config.n_shot else [] for s in subjects}
    chat = get_template(template, lm.tokenizer) if template is not None else lm.template

    started = time.perf_counter()
    items = [q for s in subjects for q in questions[s]]
    label = f"{spec.name}_{split}"
    with tqdm(total=len(items), desc=label, unit="question", disable=not progress) as bar:
        if config.scoring == "letter":
            shuffler = LfShuffler(config.seed)
            prompts = []
            for q in items:
                shots = shuffler.draw(dev[q.subject], config.n_shot)
                messages = lf_messages(q, shots, spec.subjects[q.subject][0], lang)
                prompts.append(chat.encode_oneturn(lm.tokenizer, messages)[0])
            scores = scoring.score_letters(lm, prompts, batch_size=config.batch_size, bar=bar)
        else:
            contexts = [
                harness_context(q, dev[q.subject][: config.n_shot], spec, spec.subjects[q.subject][0], lang)
                for q in items
            ]
            continuations = [f" {letter}" for letter in CHOICES]
            scores = scoring.score_loglikelihood(lm, contexts, continuations, batch_size=config.batch_size, bar=bar)
    predictions = [_prediction(q, s) for q, s in zip(items, scores, strict=True)]
    runtime = time.perf_counter() - started

    record = provenance(
        "benchmark",
        model=lm.source.display_name,
        adapters=lm.adapters,
        template=chat.name if config.scoring == "letter" else None,
        datasets=[str(root)],
        config={"benchmark": config.to_dict() | {"lang": lang}},
        recipe=_RECIPES[config.scoring],
    )
    result = BenchmarkResult.from_predictions(
        predictions,
        task=spec.name,
        split=split,
        n_shot=config.n_shot,
        scoring=config.scoring,
        lang=lang,
        runtime_s=runtime,
        record=record,
    )
    if out is not None:
        result = replace(result, save_dir=result.save(out))
    return result


def _prediction(q: Question, scores: list[float]) -> BenchmarkPrediction:
    best = max(range(len(scores)), key=lambda i: scores[i])  # the first of equal scores, as argmax
    return BenchmarkPrediction(q.subject, q.index, q.answer, CHOICES[best], tuple(scores))


_RECIPES = {
    "letter": "LLaMA-Factory: chat-template turns, exemplars from the dev split shuffled per question (numpy seed), "
    "softmax over the next-token logits of A/B/C/D (the last token of each letter's encoding)",
    "loglikelihood": "lm-evaluation-harness: raw text, the first n_shot dev questions, argmax of the summed "
    "log-probabilities of the continuations ' A', ' B', ' C', ' D'",
}
