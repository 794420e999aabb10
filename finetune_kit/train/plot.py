"""Loss plots (``plot_loss: true``): raw values plus a TensorBoard-style smoothed curve."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from finetune_kit._artifacts import LOSS_PLOT


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


def plot_loss(log_history: Sequence[dict], output_dir: Path, keys: Sequence[str] = ("loss", "eval_loss")) -> list[Path]:
    """Write ``training_<key>.png`` for each key present in ``log_history``; return the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key in keys:
        points = [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        ax.plot(steps, values, color="#1f77b4", alpha=0.35, label="original")
        ax.plot(steps, smooth(values), color="#1f77b4", label="smoothed")
        ax.set_title(f"training {key} of {output_dir.name}")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
        path = output_dir / LOSS_PLOT.format(key=key)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
