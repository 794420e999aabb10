"""Trainer callbacks: the JSONL training log that LLaMA-Factory users (and its web UI) read."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finetune_kit._artifacts import TRAINER_LOG

LOG_FILE = TRAINER_LOG


class JsonlLogCallback(TrainerCallback):
    """Append one JSON line per logging step: step, loss, lr, epoch, progress, elapsed and remaining time."""

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / LOG_FILE
        self.start = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start = time.time()
        if state.is_world_process_zero and not state.global_step and self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh log; a resumed run appends

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        elapsed = time.time() - self.start
        total = max(state.max_steps, 1)
        done = max(state.global_step, 1)
        record = {
            "current_steps": state.global_step,
            "total_steps": state.max_steps,
            "epoch": round(state.epoch or 0.0, 4),
            "percentage": round(100 * state.global_step / total, 2),
            "elapsed_time": round(elapsed, 2),
            "remaining_time": round(elapsed / done * (total - state.global_step), 2),
        }
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm", "train_loss", "num_input_tokens_seen"):
            if key in logs:
                record[key] = logs[key]
        if "num_input_tokens_seen" in logs and elapsed > 0:
            record["throughput"] = round(logs["num_input_tokens_seen"] / elapsed, 2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
