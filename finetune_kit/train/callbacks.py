"""Trainer callbacks: the JSONL training log (LLaMA-Factory's format) and what a user watches.

:func:`finetune_kit.train.progress.console_callbacks` picks them; the text they print is built
by :mod:`finetune_kit.train.metrics`. Everything here runs on the main process only
(``state.is_world_process_zero``), except :class:`CheckpointFirstLayers`, which every process runs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm
from transformers import TrainerCallback

from finetune_kit._artifacts import TRAINER_LOG
from finetune_kit.train.metrics import (
    Clock,
    Status,
    duration,
    eval_line,
    kind,
    metrics_text,
    postfix,
    step_line,
    summary_line,
)
from finetune_kit.train.plot import figure_png, loss_figure
from finetune_kit.train.speed import decoder_layers

LOG_FILE = TRAINER_LOG


def _tokens(logs: Mapping[str, Any], state: Any) -> int:
    return int(logs.get("num_input_tokens_seen") or getattr(state, "num_input_tokens_seen", 0) or 0)


class _Clocked(TrainerCallback):
    """A callback with a :class:`Clock` whose rates leave out the time spent evaluating and saving."""

    clock: Clock

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.clock.mark(_tokens({}, state))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.clock.mark(_tokens({}, state))


class JsonlLogCallback(_Clocked):
    """Append one JSON line per log to ``trainer_log.jsonl``: each logging step, evaluation and the final summary.

    Fields, first LLaMA-Factory's (``current_steps``, ``total_steps``, ``loss``, ``eval_loss``,
    ``accuracy`` (DPO's ``rewards/accuracies``), ``lr``, ``epoch``, ``percentage``,
    ``elapsed_time`` and ``remaining_time`` as ``H:MM:SS``, ``throughput`` (tokens/s since this
    session started) and ``total_tokens``), then ``tokens_per_second`` over the last logging
    interval and every other number the trainer logged under its own name (``learning_rate``,
    ``grad_norm``, ``num_input_tokens_seen``, ``rewards/margins``, ``eval_*``, ``train_*``, ...).
    A fresh run starts a fresh file; a resumed run appends.
    """

    def __init__(self, output_dir: Path, *, clock: Clock | None = None) -> None:
        self.path = Path(output_dir) / LOG_FILE
        self.clock = clock or Clock()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.clock.start(state.global_step, _tokens({}, state))
        if not state.is_world_process_zero or not self.path.exists():
            return
        if not state.global_step:
            self.path.unlink()  # a fresh run starts a fresh log; a resumed run appends
            return
        # a resumed run: drop the lines of steps after the checkpoint (a killed run logged them, they run again)
        kept = [
            line for line in self.path.read_text(encoding="utf-8").splitlines() if _step_of(line) <= state.global_step
        ]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(self.record(logs, state), ensure_ascii=False) + "\n")

    def record(self, logs: Mapping[str, Any], state: Any) -> dict[str, Any]:
        """The JSON object written for ``logs`` at ``state``."""
        step, total = state.global_step, state.max_steps
        tokens = _tokens(logs, state)
        average, recent = self.clock.token_rates(tokens) if kind(logs) == "train" else (None, None)
        if average is None and tokens and self.clock.elapsed() > 0:
            average = (tokens - self.clock.tokens0) / self.clock.elapsed() or None
        epoch = logs.get("epoch", state.epoch)
        record: dict[str, Any] = {
            "current_steps": step,
            "total_steps": total,
            "loss": logs.get("loss"),
            "eval_loss": logs.get("eval_loss"),
            "predict_loss": logs.get("predict_loss"),
            "reward": logs.get("reward"),
            "accuracy": logs.get("rewards/accuracies"),
            "lr": logs.get("learning_rate"),
            "epoch": round(epoch, 4) if isinstance(epoch, float) else epoch,
            "percentage": round(100 * step / total, 2) if total else 100,
            "elapsed_time": duration(self.clock.elapsed()),
            "remaining_time": duration(self.clock.remaining(step, total) or 0.0),
            "throughput": round(average, 2) if average else None,
            "total_tokens": tokens or None,
            "tokens_per_second": round(recent, 2) if recent else None,
        }
        for key, value in logs.items():
            if key not in record and isinstance(value, int | float) and not isinstance(value, bool):
                record[key] = value
        return {k: v for k, v in record.items() if v is not None}


class ConsoleProgressCallback(_Clocked):
    """One ``tqdm`` bar (steps, ETA; loss, lr, grad norm, tokens/s as postfix) and readable lines.

    Replaces transformers' ``ProgressCallback`` and ``PrinterCallback``, which print each log as a
    raw dict. With ``bar=False`` (``disable_tqdm``) every logging step prints one line instead.
    """

    def __init__(self, *, bar: bool = True, clock: Clock | None = None) -> None:
        self.use_bar = bar
        self.clock = clock or Clock()
        self.bar: Any = None
        self.eval_bar: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self.clock.start(state.global_step, _tokens({}, state))
        if self.use_bar:
            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc="Training", unit="step", dynamic_ncols=True
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None and state.is_world_process_zero:
            self.bar.update(state.global_step - self.bar.n)

    def on_prediction_step(
        self, args: Any, state: Any, control: Any, eval_dataloader: Any = None, **kwargs: Any
    ) -> None:
        if not (self.use_bar and state.is_world_process_zero):
            return
        if self.eval_bar is None:
            try:
                total = len(eval_dataloader)
            except TypeError:
                total = None
            self.eval_bar = tqdm(total=total, desc="Evaluating", unit="batch", leave=False, dynamic_ncols=True)
        self.eval_bar.update(1)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close_eval_bar()
        super().on_evaluate(args, state, control, **kwargs)

    def on_predict(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        self._close_eval_bar()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        step, total, what = state.global_step, state.max_steps, kind(logs)
        if what == "train":
            _, recent = self.clock.token_rates(_tokens(logs, state))
            if self.bar is not None:
                self.bar.set_postfix_str(postfix(logs, recent), refresh=True)
            else:
                self._print(step_line(logs, step, total, self.clock, recent))
        elif what == "eval":
            self._print(eval_line(logs, step, total))
        elif what == "summary":
            self._close_bar()  # the summary goes below the finished bar
            self._print(summary_line(logs, step))
        elif text := metrics_text(logs):
            self._print(f"step {step}/{total} | {text}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close_bar()

    def _print(self, line: str) -> None:
        if self.bar is not None or self.eval_bar is not None:
            tqdm.write(line)  # above the bar, which is redrawn below
        else:
            print(line, flush=True)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _close_eval_bar(self) -> None:
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None


class LivePlotCallback(_Clocked):
    """Jupyter: a loss (and eval loss) figure and a status line, updated in place.

    Replaces transformers' ``NotebookProgressCallback``. Updates come at most every ``interval``
    seconds (longer if drawing is slow: at most a quarter of the time goes to drawing), and once
    more at each evaluation and at the end. Uses ``IPython.display`` handles; draws with Agg.
    """

    def __init__(self, *, interval: float = 0.5, clock: Clock | None = None, now: Callable[[], float] = time.monotonic):
        self.interval, self.wait, self.now = interval, interval, now
        self.clock = clock or Clock(now)
        self.status: Any = None
        self.plot: Any = None
        self.latest: dict[str, Any] = {}
        self.rate: float | None = None
        self.last_update = -math.inf
        self.dirty = False
        self.done = self.text = ""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        from IPython.display import display  # noqa: PLC0415  (optional: only in a Jupyter kernel)

        self.clock.start(state.global_step, _tokens({}, state))
        self.status = display(Status(f"step {state.global_step}/{state.max_steps} | starting"), display_id=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._refresh(state)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        what = kind(logs)
        if what == "train":
            _, self.rate = self.clock.token_rates(_tokens(logs, state))
            self.latest.update(logs)
        elif what == "eval":
            self.latest.update({k: v for k, v in logs.items() if k == "eval_loss"})
        elif what == "summary":
            self.done = summary_line(logs, state.global_step)
        self.dirty = True
        self._refresh(state, force=what in ("eval", "summary"))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._refresh(state, force=True)

    def _refresh(self, state: Any, *, force: bool = False) -> None:
        start = self.now()
        if not force and start - self.last_update < self.wait:
            return
        self.last_update = start
        text = self.done or step_line(self.latest, state.global_step, state.max_steps, self.clock, self.rate)
        if self.status is not None and text != self.text:
            self.status.update(Status(text))
            self.text = text
        if self.dirty:
            self.dirty = False
            self._draw(state.log_history, state.max_steps)
            self.wait = max(self.interval, 4 * (self.now() - start))

    def _draw(self, log_history: list[dict[str, Any]], max_steps: int) -> None:
        from IPython.display import Image, display  # noqa: PLC0415  (optional: only in a Jupyter kernel)

        if not any("loss" in e or "eval_loss" in e for e in log_history):
            return
        image = Image(data=figure_png(loss_figure(log_history, size=(7.0, 3.5), xmax=max_steps)), format="png")
        if self.plot is None:
            self.plot = display(image, display_id=True)
        else:
            self.plot.update(image)


class CheckpointFirstLayers(TrainerCallback):
    """Selective gradient checkpointing: once the trainer has turned checkpointing on in every decoder
    layer, it stays on in the first ``layers`` only; the others keep their activations for the backward
    pass instead of recomputing them (``gradient_checkpointing_layers``)."""

    def __init__(self, layers: int) -> None:
        self.layers = layers
        self.checkpointed: list[bool] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        decoder = decoder_layers(model)
        for i, layer in enumerate(decoder):
            layer.gradient_checkpointing = layer.gradient_checkpointing and i < self.layers
        self.checkpointed = [layer.gradient_checkpointing for layer in decoder]


def _step_of(line: str) -> int:
    """The ``current_steps`` of one trainer_log.jsonl line; a line cut short by a kill counts as later than
    any step, so a resume drops it."""
    try:
        return int(json.loads(line).get("current_steps", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a line cut by a kill: drop it
