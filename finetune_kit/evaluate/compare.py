"""Before/after: the same benchmarks and datasets scored on a base model and a tuned one, side by side.

:func:`run_comparison` (public entry: ``Evaluator.compare``) evaluates both models with the same
settings, then a :class:`Comparison` holds one row per score — a benchmark's average and categories,
a dataset's ROUGE/BLEU — with the base value, the tuned value and the difference. It writes
``comparison.md`` (the table), ``comparison.png`` (a bar chart of the differences) and
``comparison.json``, and shows table and chart inline in Jupyter.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from finetune_kit._fs import write_json, write_text
from finetune_kit.data.conversations import Conversations
from finetune_kit.errors import ConfigError, OutputExistsError
from finetune_kit.evaluate.benchmark import AVERAGE, BenchmarkResult, check_save_dir
from finetune_kit.evaluate.config import BenchmarkConfig
from finetune_kit.evaluate.metrics import SCORE_KEYS
from finetune_kit.evaluate.result import EvalReport

if TYPE_CHECKING:
    from finetune_kit.evaluate.evaluator import Evaluator

COMPARISON_TABLE = "comparison.md"
COMPARISON_PLOT = "comparison.png"
COMPARISON_JSON = "comparison.json"

Kind = Literal["benchmark", "dataset"]


@dataclass(frozen=True)
class ComparisonRow:
    """One score of both models: ``source`` (a benchmark task or a dataset), ``metric``, ``count`` behind it."""

    kind: Kind
    source: str
    metric: str
    base: float
    tuned: float
    count: int

    @property
    def delta(self) -> float:
        """``tuned - base``, in points (accuracy % or score x100)."""
        return self.tuned - self.base


@dataclass(frozen=True)
class Comparison:
    """Scores of a base model and a tuned one on the same benchmarks and datasets.

    ``rows`` holds every score with both values (:class:`ComparisonRow`); ``benchmarks`` and
    ``predictions`` the full results behind them, as ``(base, tuned)`` pairs. In Jupyter the object
    shows its table and the chart of differences. Example::

        comparison = Evaluator.compare(base, tuned, datasets=[test], save_dir="saves/compare")
        print(comparison.format())
    """

    base_name: str
    tuned_name: str
    rows: tuple[ComparisonRow, ...]
    benchmarks: tuple[tuple[BenchmarkResult, BenchmarkResult], ...] = field(default=(), repr=False)
    predictions: tuple[tuple[EvalReport, EvalReport], ...] = field(default=(), repr=False)
    save_dir: Path | None = None

    @classmethod
    def of(
        cls,
        base_name: str,
        tuned_name: str,
        *,
        benchmarks: Sequence[tuple[BenchmarkResult, BenchmarkResult]] = (),
        predictions: Mapping[str, tuple[EvalReport, EvalReport]] | None = None,
    ) -> Comparison:
        """Build the rows from results already computed: ``(base, tuned)`` benchmark pairs, and dataset name ->
        ``(base, tuned)`` prediction reports."""
        rows: list[ComparisonRow] = []
        for before, after in benchmarks:
            if (before.task, before.split, before.n_shot, before.scoring) != (
                after.task,
                after.split,
                after.n_shot,
                after.scoring,
            ):
                raise ValueError(
                    f"benchmark results of different runs cannot be compared: {before!r} and {after!r}. Fix: pair "
                    "results of the same task, split, n_shot and scoring"
                )
            source = f"{before.task}_{before.split}"
            keys = [AVERAGE, *[c for c in before.categories if c in after.categories]]
            values_before = {AVERAGE: before.accuracy, **before.categories}
            values_after = {AVERAGE: after.accuracy, **after.categories}
            rows += [
                ComparisonRow("benchmark", source, k, values_before[k], values_after[k], before.counts[k]) for k in keys
            ]
        for name, (old, new) in (predictions or {}).items():
            rows += [
                ComparisonRow("dataset", name, k, old.scores[k], new.scores[k], new.num_samples) for k in SCORE_KEYS
            ]
        return cls(
            base_name,
            tuned_name,
            tuple(rows),
            benchmarks=tuple(benchmarks),
            predictions=tuple((predictions or {}).values()),
        )

    def __repr__(self) -> str:
        sources = list(dict.fromkeys(r.source for r in self.rows))
        headline = ", ".join(f"{r.source} {r.metric} {r.delta:+.2f}" for r in self._headlines())
        where = f", save_dir='{self.save_dir}'" if self.save_dir is not None else ""
        return f"Comparison({self.base_name} -> {self.tuned_name}: {len(sources)} sources, {headline}{where})"

    def _headlines(self) -> list[ComparisonRow]:
        """Each source's main score: a benchmark's average, a dataset's ROUGE-L."""
        return [r for r in self.rows if r.metric in (AVERAGE, "rouge-l")]

    def format(self) -> str:
        """The table as aligned plain text (what the CLI prints)."""
        width = max([len(f"{r.source} {r.metric}") for r in self.rows] + [5])
        lines = [
            f"base:  {self.base_name}",
            f"tuned: {self.tuned_name}",
            "",
            f"{'score':<{width}} {'base':>8} {'tuned':>8} {'delta':>8} {'n':>5}",
        ]
        lines += [
            f"{r.source + ' ' + r.metric:<{width}} {r.base:>8.2f} {r.tuned:>8.2f} {r.delta:>+8.2f} {r.count:>5}"
            for r in self.rows
        ]
        return "\n".join(lines)

    def markdown(self) -> str:
        """The table as Markdown (``comparison.md``): one line per score, the delta signed."""
        lines = [
            "# Before / after",
            "",
            f"- base: `{self.base_name}`",
            f"- tuned: `{self.tuned_name}`",
            "",
            "Benchmarks: accuracy in %; datasets: ROUGE/BLEU x100 (LLaMA-Factory's predict metrics).",
            "",
            "| source | score | base | tuned | delta | n |",
            "|---|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r.source} | {r.metric} | {r.base:.2f} | {r.tuned:.2f} | {r.delta:+.2f} | {r.count} |"
            for r in self.rows
        ]
        if self.save_dir is not None:
            lines += ["", f"![differences]({COMPARISON_PLOT})"]
        return "\n".join(lines) + "\n"

    def figure(self) -> Any:
        """A ``matplotlib`` figure: one horizontal bar per score, the tuned minus the base value."""
        from matplotlib.figure import Figure

        labels = [f"{r.source}: {r.metric}" for r in self.rows]
        deltas = [r.delta for r in self.rows]
        fig = Figure(figsize=(7.0, 1.2 + 0.32 * len(self.rows)), dpi=100)
        ax = fig.add_subplot(111)
        positions = list(range(len(self.rows)))[::-1]
        colors = [_color(d, "#7f7f7f") for d in deltas]
        ax.barh(positions, deltas, color=colors)
        ax.set_yticks(positions, labels)
        ax.axvline(0, color="black", linewidth=0.8)
        span = max([abs(d) for d in deltas] + [1.0])
        for y, d in zip(positions, deltas, strict=True):
            ax.text(d + (0.02 * span if d >= 0 else -0.02 * span), y, f"{d:+.2f}", va="center",
                    ha="left" if d >= 0 else "right", fontsize=8)  # fmt: skip
        ax.set_xlim(-1.25 * span, 1.25 * span)
        ax.set_xlabel("tuned - base (accuracy points; score x100)")
        ax.set_title("Before / after: what changed")
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        return fig

    def png(self) -> bytes:
        """:meth:`figure` rendered as PNG bytes."""
        buffer = io.BytesIO()
        self.figure().savefig(buffer, format="png")
        return buffer.getvalue()

    def to_dict(self) -> dict[str, Any]:
        """Names and rows as plain JSON values."""
        return {
            "base": self.base_name,
            "tuned": self.tuned_name,
            "rows": [
                {
                    "kind": r.kind,
                    "source": r.source,
                    "metric": r.metric,
                    "base": r.base,
                    "tuned": r.tuned,
                    "delta": r.delta,
                    "count": r.count,
                }  # fmt: skip
                for r in self.rows
            ],
        }

    def save(self, save_dir: str | os.PathLike[str]) -> Comparison:
        """Write ``comparison.md``, ``comparison.png`` and ``comparison.json`` into ``save_dir``; returns
        the Comparison with ``save_dir`` set. Files already there are not overwritten."""
        out = Path(save_dir)
        taken = [out / n for n in (COMPARISON_TABLE, COMPARISON_PLOT, COMPARISON_JSON) if (out / n).exists()]
        if taken:
            raise OutputExistsError(
                f"{taken[0]} already exists (an earlier comparison); refusing to overwrite it. Fix: pass a new save_dir"
            )
        out.mkdir(parents=True, exist_ok=True)
        saved = replace(self, save_dir=out)
        (out / COMPARISON_PLOT).write_bytes(self.png())
        write_text(out / COMPARISON_TABLE, saved.markdown())
        write_json(out / COMPARISON_JSON, self.to_dict())
        return saved

    def _repr_markdown_(self) -> str:
        return self.markdown().replace(f"![differences]({COMPARISON_PLOT})", "")

    def _repr_html_(self) -> str:
        cells = "".join(
            f"<tr><td>{html.escape(r.source)}</td><td>{html.escape(r.metric)}</td>"
            + "".join(f"<td style='text-align:right'>{v}</td>" for v in (f"{r.base:.2f}", f"{r.tuned:.2f}"))
            + f"<td style='text-align:right;color:{_color(r.delta, 'inherit')}'>{r.delta:+.2f}</td>"
            f"<td style='text-align:right'>{r.count}</td></tr>"
            for r in self.rows
        )
        image = base64.b64encode(self.png()).decode("ascii")
        return (
            f"<b>base</b> {html.escape(self.base_name)} &rarr; <b>tuned</b> {html.escape(self.tuned_name)}"
            "<table><tr><th>source</th><th>score</th><th>base</th><th>tuned</th><th>delta</th><th>n</th></tr>"
            f"{cells}</table><img src='data:image/png;base64,{image}' alt='differences'/>"
        )


BenchmarkSpecs = Sequence[BenchmarkConfig] | BenchmarkConfig | Mapping[str, str | os.PathLike[str]]
DatasetSpecs = Sequence[Conversations] | Conversations


def benchmark_configs(benchmarks: BenchmarkSpecs) -> list[BenchmarkConfig]:
    """``benchmarks`` as configs: a config, a list of them, or a task -> task_dir mapping (default settings)."""
    if isinstance(benchmarks, BenchmarkConfig):
        return [benchmarks]
    if isinstance(benchmarks, Mapping):
        return [BenchmarkConfig(task=task, task_dir=os.fspath(folder)) for task, folder in benchmarks.items()]
    configs = list(benchmarks)
    wrong = [type(b).__name__ for b in configs if not isinstance(b, BenchmarkConfig)]
    if wrong:
        raise TypeError(
            f"benchmarks takes BenchmarkConfig objects or a task -> task_dir mapping, got {', '.join(wrong)}. Fix: "
            "benchmarks={'mmlu_test': 'data/mmlu'} or "
            "[BenchmarkConfig(task='mmlu_test', task_dir='data/mmlu', n_shot=5)]"
        )
    missing = [i for i, b in enumerate(configs) if b.task is None]
    if missing:
        raise ConfigError(f"benchmarks[{missing[0]}] names no task. Fix: BenchmarkConfig(task='mmlu_test', ...)")
    return configs


def dataset_names(datasets: DatasetSpecs) -> dict[str, Conversations]:
    """Each dataset under a unique name (its registry names joined with ``+``; ``dataset_<i>`` if it has none)."""
    items = [datasets] if isinstance(datasets, Conversations) else list(datasets)
    named: dict[str, Conversations] = {}
    for i, data in enumerate(items):
        if not isinstance(data, Conversations):
            raise TypeError(
                f"datasets[{i}] is a {type(data).__name__}; expected loaded Conversations. Fix: "
                "datasets=[DatasetRegistry.from_dir('data').load('my_test')]"
            )
        name = "+".join(data.names) or f"dataset_{i}"
        named[name if name not in named else f"{name}_{i}"] = data
    return named


def run_comparison(
    base: Evaluator,
    tuned: Evaluator,
    *,
    names: tuple[str, str],
    benchmarks: BenchmarkSpecs,
    datasets: DatasetSpecs,
    save_dir: str | os.PathLike[str] | None,
    progress: bool,
) -> Comparison:
    """Score both evaluators' models on every benchmark and dataset; everything is checked before the first run.

    ``names`` are the two models' names as the report shows them.
    """
    configs = benchmark_configs(benchmarks)
    named = dataset_names(datasets)
    if not configs and not named:
        raise ConfigError(
            "compare needs something to score: benchmarks, datasets or both. Fix: "
            "datasets=[registry.load('my_test')] and/or benchmarks={'mmlu_test': 'data/mmlu'}"
        )
    sources = [str(c.task) for c in configs] + list(named)
    if len(set(sources)) != len(sources):
        raise ConfigError(f"the same benchmark is listed twice in {sources}; list each once")
    out = Path(save_dir) if save_dir is not None else None
    if out is not None:
        check_save_dir(out)

    def where(side: str, source: str) -> Path | None:
        return out / side / source if out is not None else None

    pairs: list[tuple[BenchmarkResult, BenchmarkResult]] = []
    for c in configs:
        assert c.task is not None  # checked in benchmark_configs
        runs = [
            ev.benchmark(
                c.task,
                task_dir=c.task_dir,
                n_shot=c.n_shot,
                lang=c.lang,
                batch_size=c.batch_size,
                seed=c.seed,
                scoring=c.scoring,
                subjects=c.subjects,
                save_dir=where(side, c.task),
                progress=progress,
            )  # fmt: skip
            for side, ev in (("base", base), ("tuned", tuned))
        ]
        pairs.append((runs[0], runs[1]))
    reports: dict[str, tuple[EvalReport, EvalReport]] = {}
    for name, data in named.items():
        b, t = (ev.predict(data, output_dir=where(side, name), progress=progress) for side, ev in
                (("base", base), ("tuned", tuned)))  # fmt: skip
        reports[name] = (b, t)
    comparison = Comparison.of(names[0], names[1], benchmarks=pairs, predictions=reports)
    return comparison.save(out) if out is not None else comparison


def _color(delta: float, zero: str) -> str:
    return "#2ca02c" if delta > 0 else "#d62728" if delta < 0 else zero
