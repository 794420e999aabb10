"""Dataset reports: rows, bad rows and token lengths with a chat template, before any training.

:func:`build_report` tokenizes each dataset twice with the library's own encoder
(:func:`~finetune_kit.data.tokenize.tokenize`): once with ``cutoff_len`` and once without a
limit, so the untruncated lengths, the truncated examples and the trained tokens that
``cutoff_len`` cuts off are exact, not estimates. ``finetune-kit data check CONFIG.yaml``
prints the result and writes :data:`REPORT_PLOT` and :data:`REPORT_JSON`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_kit.data.config import EncodingConfig
from finetune_kit.data.template import ChatTemplate
from finetune_kit.data.tokenize import TokenizedDataset, tokenize
from finetune_kit.errors import ConfigError, DatasetError

if TYPE_CHECKING:
    from finetune_kit.data.registry import DatasetRegistry

REPORT_JSON = "data_report.json"
REPORT_PLOT = "data_report.png"
PROBLEMS_SHOWN = 50  # bad rows printed per dataset; to_dict() keeps all of them
_UNLIMITED = 10**9  # a cutoff_len no example reaches: the untruncated encoding


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), interpolating linearly between ranks (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (rank - low) * (ordered[high] - ordered[low])


@dataclass(frozen=True)
class DatasetReport:
    """One dataset: its rows, its bad rows and, when measured, its token lengths.

    ``lengths`` are the untruncated token counts of the examples that load (the good rows, the
    first ``max_samples`` of them if set); ``tokens`` and ``trained_tokens`` count what is left
    after ``cutoff_len``; ``truncated`` is how many examples ``cutoff_len`` cuts and
    ``trained_tokens_lost`` how many trained tokens that cut removes. ``lengths`` is None when
    the lengths were not measured, and ``not_measured`` says why.
    """

    name: str
    rows: int
    bad_rows: tuple[str, ...] = ()
    lengths: tuple[int, ...] | None = field(default=None, repr=False)
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    trained_tokens_lost: int = 0
    not_measured: str | None = None

    def __repr__(self) -> str:
        sizes = (
            f", p50={_number(self.p50)}, max={self.max_length}, truncated={self.truncated}"
            if self.lengths
            else f", not measured: {self.not_measured}"
            if self.not_measured
            else ""
        )
        return f"DatasetReport({self.name!r}, {self.rows} rows, {self.bad_count} bad{sizes})"

    @property
    def bad_count(self) -> int:
        return len(self.bad_rows)

    @property
    def examples(self) -> int:
        """How many examples were measured (0 when none were)."""
        return len(self.lengths or ())

    def _pct(self, q: float) -> float | None:
        return percentile(self.lengths, q) if self.lengths else None

    @property
    def p50(self) -> float | None:
        return self._pct(50)

    @property
    def p90(self) -> float | None:
        return self._pct(90)

    @property
    def p99(self) -> float | None:
        return self._pct(99)

    @property
    def max_length(self) -> int | None:
        return max(self.lengths) if self.lengths else None

    @property
    def trained_fraction(self) -> float | None:
        """Trained tokens / all tokens, both after truncation (None when nothing was measured)."""
        return self.trained_tokens / self.tokens if self.tokens else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rows": self.rows,
            "bad_count": self.bad_count,
            "bad_rows": list(self.bad_rows),
            "examples": self.examples,
            "p50": _rounded(self.p50),
            "p90": _rounded(self.p90),
            "p99": _rounded(self.p99),
            "max": self.max_length,
            "truncated": self.truncated,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "trained_tokens_lost": self.trained_tokens_lost,
            "trained_fraction": _rounded(self.trained_fraction, 4),
            "not_measured": self.not_measured,
            "lengths": None if self.lengths is None else list(self.lengths),
        }


@dataclass(frozen=True)
class DataReport:
    """Per-dataset reports plus the encoding they were measured with (``template`` None: rows only).

    Example::

        report = build_report(registry, "shop_alpaca", model.tokenizer, model.template, cutoff_len=1024)
        print(report)                       # a table: rows, bad, p50/p90/p99/max, truncated, trained
        report.histogram("data_report.png") # token lengths per dataset, with cutoff_len marked
    """

    datasets: tuple[DatasetReport, ...]
    template: str | None = None
    cutoff_len: int | None = None
    train_on_prompt: bool = False
    mask_history: bool = False
    max_samples: int | None = None

    def __repr__(self) -> str:
        rows = sum(d.rows for d in self.datasets)
        how = f", template={self.template}, cutoff_len={self.cutoff_len}" if self.template else ""
        return f"DataReport({len(self.datasets)} datasets, {rows} rows, {self.bad_count} bad{how})"

    def __str__(self) -> str:
        return self.format()

    def __getitem__(self, name: str) -> DatasetReport:
        for d in self.datasets:
            if d.name == name:
                return d
        raise KeyError(f"{name!r} is not in this report (datasets: {', '.join(d.name for d in self.datasets)})")

    @property
    def bad_count(self) -> int:
        """Bad rows over all datasets."""
        return sum(d.bad_count for d in self.datasets)

    @property
    def measured(self) -> bool:
        """True when at least one dataset has token lengths (what :meth:`histogram` plots)."""
        return any(d.lengths for d in self.datasets)

    def format(self, max_problems: int = PROBLEMS_SHOWN) -> str:
        """The report as text: a table of every dataset, then the bad rows (``max_problems`` per dataset)."""
        if self.template is None:
            return self._format_rows(max_problems)
        header = ["dataset", "rows", "bad", "p50", "p90", "p99", "max", "truncated", "trained lost", "trained"]
        table = [header] + [
            [
                d.name,
                str(d.rows),
                str(d.bad_count),
                *(_number(v) for v in (d.p50, d.p90, d.p99, d.max_length)),
                *((str(d.truncated), str(d.trained_tokens_lost)) if d.lengths else ("-", "-")),
                "-" if d.trained_fraction is None else f"{d.trained_fraction:.1%}",
            ]
            for d in self.datasets
        ]
        lines = [
            f"template {self.template}, cutoff_len {self.cutoff_len}, train_on_prompt {_yes(self.train_on_prompt)}, "
            f"mask_history {_yes(self.mask_history)}"
            + (f", first {self.max_samples} rows of each dataset" if self.max_samples else ""),
            *_aligned(table),
            "p50..max: tokens per example before cutoff_len; truncated: examples longer than cutoff_len;",
            "trained lost: trained tokens the truncation removes; trained: trained share of the tokens kept",
        ]
        if any(d.bad_rows or d.not_measured for d in self.datasets):
            lines.append("")
        for d in self.datasets:
            if d.bad_rows:
                lines.append(f"{d.name}: {d.bad_count} bad rows")
                lines += _problems(d, max_problems)
            if d.not_measured:
                lines.append(f"{d.name}: lengths not measured: {d.not_measured}")
        return "\n".join(lines)

    def _format_rows(self, max_problems: int) -> str:
        lines = []
        for d in self.datasets:
            lines.append(f"{d.name}: {d.rows} rows, {'ok' if not d.bad_rows else f'{d.bad_count} bad rows'}")
            lines += _problems(d, max_problems)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Everything in the report as JSON-ready values (every bad row and every length included)."""
        return {
            "template": self.template,
            "cutoff_len": self.cutoff_len,
            "train_on_prompt": self.train_on_prompt,
            "mask_history": self.mask_history,
            "max_samples": self.max_samples,
            "bad_count": self.bad_count,
            "datasets": [d.to_dict() for d in self.datasets],
        }

    def histogram(self, path: str | os.PathLike[str]) -> Path:
        """Write a PNG with one token-length histogram per measured dataset, ``cutoff_len`` marked; return it."""
        measured = [d for d in self.datasets if d.lengths]
        if not measured:
            raise DatasetError(
                "no dataset of this report has token lengths to plot. Fix: build it with a tokenizer "
                "(build_report) and datasets whose rows load"
            )
        # A bare Figure renders PNG through Agg without pyplot, so the user's backend is left alone.
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7.0, 2.6 * len(measured)), dpi=100)
        axes = fig.subplots(len(measured), 1, squeeze=False)[:, 0]
        for ax, d in zip(axes, measured, strict=True):
            lengths = d.lengths or ()
            ax.hist(lengths, bins=min(50, len(set(lengths))), color="#1f77b4")
            ax.axvline(self.cutoff_len or 0, color="#d62728", linestyle="--", label=f"cutoff_len {self.cutoff_len}")
            ax.set_title(f"{d.name}: {d.examples} examples, {d.truncated} truncated")
            ax.set_xlabel(f"tokens per example (template {self.template}, before cutoff_len)")
            ax.set_ylabel("examples")
            ax.yaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
        return out


def check_rows(registry: DatasetRegistry, names: str | Iterable[str]) -> DataReport:
    """Rows and bad rows of each named dataset, without a tokenizer (``finetune-kit data check DIR``)."""
    return DataReport(tuple(DatasetReport(name, *_check(registry, name)) for name in _names(names)))


def build_report(
    registry: DatasetRegistry,
    names: str | Iterable[str],
    tokenizer: Any,
    template: ChatTemplate,
    *,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    max_samples: int | None = None,
) -> DataReport:
    """Rows, bad rows and token lengths of each named dataset, encoded as training would encode them.

    ``template`` is the :class:`ChatTemplate` training uses (``LoadedModel.template``). Lengths
    are measured over the rows that load (the first ``max_samples`` if given): a dataset with bad
    rows is measured over its good rows when the registry can skip them, else not at all; hub
    datasets are not downloaded. ``not_measured`` says why a dataset has no lengths.

    Example::

        model = ModelSource.bundled().load()
        report = build_report(DatasetRegistry.demo(), "shop_alpaca,shop_sharegpt", model.tokenizer,
                              model.template, cutoff_len=256)
        print(report["shop_alpaca"].p99, report["shop_alpaca"].truncated)
    """
    encoding = EncodingConfig(cutoff_len=cutoff_len, train_on_prompt=train_on_prompt, mask_history=mask_history)
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"max_samples: got {max_samples}; expected a positive row count")
    reports = []
    for name in _names(names):
        rows, bad = _check(registry, name)
        why, data = _load(registry, name, bad, max_samples)
        report = DatasetReport(name, rows, bad, not_measured=why)
        reports.append(report if data is None else _measure(report, data, tokenizer, template, encoding))
    return DataReport(
        tuple(reports),
        template=template.name,
        cutoff_len=encoding.cutoff_len,
        train_on_prompt=encoding.train_on_prompt,
        mask_history=encoding.mask_history,
        max_samples=max_samples,
    )


def _measure(
    report: DatasetReport, data: Any, tokenizer: Any, template: ChatTemplate, encoding: EncodingConfig
) -> DatasetReport:
    """Encode ``data`` without a limit and with ``cutoff_len``; the difference is what truncation costs."""

    def encode(cutoff_len: int) -> TokenizedDataset:
        return tokenize(
            data,
            tokenizer,
            template,
            cutoff_len=cutoff_len,
            train_on_prompt=encoding.train_on_prompt,
            mask_history=encoding.mask_history,
        )

    full, cut = encode(_UNLIMITED), encode(encoding.cutoff_len)
    return replace(
        report,
        lengths=tuple(len(ids) for ids in full.dataset["input_ids"]),
        tokens=cut.num_tokens,
        trained_tokens=cut.num_trained_tokens,
        truncated=cut.truncated,
        trained_tokens_lost=full.num_trained_tokens - cut.num_trained_tokens,
    )


def _names(names: str | Iterable[str]) -> list[str]:
    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else [n.strip() for n in names]
    wanted = list(dict.fromkeys(n for n in wanted if n))
    if not wanted:
        raise DatasetError("no dataset names given. Fix: pass names from dataset_info.json, e.g. 'shop_alpaca'")
    return wanted


def _check(registry: DatasetRegistry, name: str) -> tuple[int, tuple[str, ...]]:
    rows, bad = registry.check(name)
    return rows, tuple(bad)


def _load(registry: DatasetRegistry, name: str, bad: Sequence[str], max_samples: int | None) -> tuple[str | None, Any]:
    """``(None, conversations)``, or ``(why not, None)`` when the rows of ``name`` cannot be measured."""
    if registry.spec(name).file_name is None:
        return "a hub dataset: data check does not download it (training reads and checks it)", None
    # bad rows are listed by check(); lengths are measured over the good ones
    try:
        data = registry.load(name, max_samples=max_samples, skip_invalid=bool(bad))
    except DatasetError as exc:
        return str(exc), None
    return None, data


def _problems(d: DatasetReport, limit: int) -> list[str]:
    lines = [f"  {p}" for p in d.bad_rows[:limit]]
    if d.bad_count > limit:
        lines.append(f"  ... and {d.bad_count - limit} more")
    return lines


def _aligned(table: list[list[str]]) -> list[str]:
    """Rows of cells as text columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for row in table:
        cells = [row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))]
        lines.append("  ".join(cells))
    return lines


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _rounded(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _yes(flag: bool) -> str:
    return "true" if flag else "false"
