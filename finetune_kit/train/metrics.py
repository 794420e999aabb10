"""Training metrics as a person reads them: elapsed time, ETA, token rates and one-line summaries.

Pure Python (no torch/transformers): the callbacks of :mod:`finetune_kit.train.callbacks` print
and write what these functions build. A log is a ``Trainer`` log dict (``{"loss": ..., "grad_norm":
..., "learning_rate": ..., "epoch": ..., "num_input_tokens_seen": ...}``, eval logs ``eval_*``).
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

# log keys shown under a shorter name on the bar and in the lines
SHORT = {"learning_rate": "lr", "rewards/accuracies": "acc", "rewards/margins": "margin"}
# keys a train log carries that the readable line leaves out (speed metrics of the session so far)
QUIET = ("epoch", "num_input_tokens_seen", "train_runtime", "train_tokens_per_second", "total_flos", "step")


class Clock:
    """Elapsed time, ETA and token rates of one training session (a resumed run starts a new one)."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self.now = now
        self.start(0, 0)

    def start(self, step: int, tokens: int) -> None:
        self.t0 = self.last_t = self.now()
        self.step0, self.tokens0, self.last_tokens = step, tokens, tokens

    def elapsed(self) -> float:
        return self.now() - self.t0

    def remaining(self, step: int, total: int) -> float | None:
        """Seconds left at this session's pace so far; ``None`` before the first step."""
        done = step - self.step0
        return self.elapsed() / done * max(total - step, 0) if done > 0 else None

    def mark(self, tokens: int) -> None:
        """Restart the recent-rate window (after an evaluation or a checkpoint save, which process no tokens)."""
        self.last_t, self.last_tokens = self.now(), tokens

    def token_rates(self, tokens: int) -> tuple[float | None, float | None]:
        """Tokens/s since the session started and since the previous call (which this call resets)."""
        now = self.now()
        total = (tokens - self.tokens0) / (now - self.t0) if now > self.t0 and tokens > self.tokens0 else None
        recent = (
            (tokens - self.last_tokens) / (now - self.last_t)
            if now > self.last_t and tokens > self.last_tokens
            else None
        )
        self.last_t, self.last_tokens = now, tokens
        return total, recent


class Status:
    """A one-line text display for Jupyter: plain text, or ``<pre>`` where HTML renders."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:
        return f"<pre style='margin:0'>{html.escape(self.text)}</pre>"


def duration(seconds: float | None) -> str:
    """``H:MM:SS``, as LLaMA-Factory writes ``elapsed_time`` and ``remaining_time``; ``?`` if unknown."""
    return "?" if seconds is None or not math.isfinite(seconds) else str(timedelta(seconds=int(seconds)))


def number(value: Any, key: str = "") -> str:
    """A metric as a person reads it: 4 significant digits, learning rates in scientific notation."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if "tokens" in key else str(value)
    if key in ("learning_rate", "lr") or (value != 0 and not 1e-3 <= abs(value) < 1e5):
        return f"{value:.2e}"
    return f"{value:.4g}"


def metrics_text(logs: Mapping[str, Any], *, skip: tuple[str, ...] = QUIET, strip: str = "") -> str:
    """``loss 10.82 | lr 1.00e-02 | grad_norm 0.424`` for the numeric entries of ``logs``."""
    parts = []
    for key, value in logs.items():
        if key in skip or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        name = key.removeprefix(strip)
        parts.append(f"{SHORT.get(name, name)} {number(value, name)}")
    return " | ".join(parts)


def postfix(logs: Mapping[str, Any], tokens_per_second: float | None) -> str:
    """The bar's postfix for a train log: ``loss=10.82, lr=1.00e-02, grad_norm=0.424, tok/s=868``."""
    keys = ("loss", "learning_rate", "grad_norm", "rewards/accuracies", "rewards/margins")
    parts = [f"{SHORT.get(k, k)}={number(logs[k], k)}" for k in keys if isinstance(logs.get(k), int | float)]
    if tokens_per_second:
        parts.append(f"tok/s={tokens_per_second:,.0f}")
    return ", ".join(parts)


def step_line(logs: Mapping[str, Any], step: int, total: int, clock: Clock, tokens_per_second: float | None) -> str:
    """One readable line per logging step when there is no bar (``disable_tqdm``)."""
    parts = [f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)", metrics_text(logs)]
    if tokens_per_second:
        parts.append(f"{tokens_per_second:,.0f} tok/s")
    if "epoch" in logs:
        parts.append(f"epoch {logs['epoch']:.2f}")
    parts.append(f"{duration(clock.elapsed())} elapsed, ETA {duration(clock.remaining(step, total))}")
    return " | ".join(p for p in parts if p)


def eval_line(logs: Mapping[str, Any], step: int, total: int) -> str:
    """``eval @ step 2/4 | loss 10.51 | 0.31 s``: one line per evaluation (``eval_`` dropped from the names)."""
    skip = (*QUIET, "eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
    text = metrics_text(logs, skip=skip, strip="eval_")
    runtime = logs.get("eval_runtime")
    tail = f" | {runtime:.2f} s" if isinstance(runtime, int | float) else ""
    return f"eval @ step {step}/{total} | {text}{tail}"


def summary_line(logs: Mapping[str, Any], step: int) -> str:
    """The closing line: steps, final average loss, runtime and throughput."""
    parts = [f"training done: {step} steps"]
    if "train_loss" in logs:
        parts.append(f"train_loss {number(logs['train_loss'])}")
    runtime = logs.get("train_runtime")
    if isinstance(runtime, int | float):
        parts.append(f"runtime {runtime:.1f} s" if runtime < 60 else f"runtime {duration(runtime)}")
    for key, unit in (("train_samples_per_second", "samples/s"), ("train_steps_per_second", "steps/s")):
        if key in logs:
            parts.append(f"{logs[key]:.3g} {unit}")
    if logs.get("num_input_tokens_seen"):
        parts.append(f"{logs['num_input_tokens_seen']:,} tokens")
    return " | ".join(parts)


def kind(logs: Mapping[str, Any]) -> str:
    """``"train"`` (a logging step), ``"eval"``, ``"summary"`` (the end of ``train()``) or ``"other"``."""
    if "train_loss" in logs and "train_runtime" in logs:
        return "summary"
    if any(k.startswith("eval_") for k in logs):
        return "eval"
    if "loss" in logs:
        return "train"
    return "other"
