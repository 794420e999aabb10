"""Loss plots: ``training_<key>.png`` files (``plot_loss: true``) and the live figure of a notebook run.

Both draw raw values plus a TensorBoard-style smoothed curve with the same function. Figures are
built with ``matplotlib.figure.Figure``, never ``pyplot``: nothing changes the user's backend, and a
notebook does not show a second copy of the figure when the cell ends.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from finetune_kit._artifacts import LOSS_PLOT

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")


def smooth(values: Sequence[float], weight: float | None = None) -> list[float]:
    """Exponential moving average with TensorBoard's debiasing; weight grows with the series length."""
    if not values:
        return []
    if weight is None:
        weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)  # ~0 for few points, ->0.9 for many
    out, last, n = [], 0.0, 0
    for v in values:
        n += 1
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight**n) if weight > 0 else v)
    return out


def series(log_history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """The steps and finite values of ``key`` in a ``Trainer`` log history."""
    steps, values = [], []
    for entry in log_history:
        value = entry.get(key)
        if isinstance(value, int | float) and math.isfinite(value) and "step" in entry:
            steps.append(int(entry["step"]))
            values.append(float(value))
    return steps, values


def loss_figure(
    log_history: Sequence[Mapping[str, Any]],
    keys: Sequence[str] = ("loss", "eval_loss"),
    *,
    title: str | None = None,
    size: tuple[float, float] = (6.4, 4.0),
    xmax: int | None = None,
) -> Any:
    """A ``matplotlib`` figure with one curve per key of ``keys`` found in ``log_history`` (raw and smoothed).

    A series of one point, and an evaluation series, are drawn with markers. ``xmax`` (the run's
    total steps) fixes the step axis, so a live plot shows how far training has come. Returns the
    figure even if no key has values.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    ax = fig.add_subplot(111)
    drawn = []
    for key, color in zip(keys, COLORS * (1 + len(keys) // len(COLORS)), strict=False):
        steps, values = series(log_history, key)
        if not steps:
            continue
        drawn.append(key)
        if len(steps) == 1 or key.startswith("eval_"):  # evaluations are few: every point matters
            ax.plot(steps, values, color=color, marker="o", markersize=4, label=key)
            continue
        ax.plot(steps, values, color=color, alpha=0.35, label=f"{key} (original)" if len(keys) > 1 else "original")
        ax.plot(steps, smooth(values), color=color, label=f"{key} (smoothed)" if len(keys) > 1 else "smoothed")
    if xmax:
        ax.set_xlim(0, xmax)
    ax.set_xlabel("step")
    ax.set_ylabel(drawn[0] if len(drawn) == 1 else "loss")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend()
    fig.tight_layout()
    return fig


def figure_png(fig: Any) -> bytes:
    """``fig`` rendered as PNG bytes (with Agg, whatever backend pyplot uses)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def plot_loss(log_history: Sequence[dict], output_dir: Path, keys: Sequence[str] = ("loss", "eval_loss")) -> list[Path]:
    """Write ``training_<key>.png`` for each key present in ``log_history``; return the files written.

    A ``/`` in a key becomes ``_`` in the file name, as in LLaMA-Factory (``rewards/accuracies`` ->
    ``training_rewards_accuracies.png``).
    """
    written = []
    for key in keys:
        if not series(log_history, key)[0]:
            continue
        fig = loss_figure(log_history, (key,), title=f"training {key} of {Path(output_dir).name}")
        path = Path(output_dir) / LOSS_PLOT.format(key=key.replace("/", "_"))
        fig.savefig(path, format="png")
        written.append(path)
    return written
