"""A training run of the board: ``finetune-kit train file.yaml`` in a child process, watched through its files.

The child writes ``trainer_log.jsonl`` in its output_dir (one line per logging step, with steps,
loss, elapsed time and ETA) and its console output to a log file; :meth:`TrainingRun.status`
reads both. Stopping sends SIGTERM, on which the trainer saves a checkpoint at the end of the
step and exits (a second stop ends it at once), so the board stays usable whatever the child does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from finetune_kit._artifacts import TRAINER_LOG
from finetune_kit.errors import TrainingError
from finetune_kit.train.safety import checkpoints
from finetune_kit.webui.form import to_yaml

State = Literal["idle", "running", "stopping", "finished", "stopped", "failed"]
LOG_LINES = 30
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding finetune_kit/: the child imports this copy


@dataclass(frozen=True)
class RunStatus:
    """What the board shows of a run: its state, progress, ETA, loss records and the log's last lines."""

    state: State
    output_dir: str = ""
    step: int = 0
    total: int = 0
    elapsed: str = ""
    remaining: str = ""
    loss: float | None = None
    records: tuple[dict[str, Any], ...] = field(default=(), repr=False)
    log_tail: str = field(default="", repr=False)
    returncode: int | None = None

    @property
    def percentage(self) -> float:
        return 100.0 * self.step / self.total if self.total else 0.0

    @property
    def active(self) -> bool:
        return self.state in ("running", "stopping")

    def history(self) -> list[dict[str, Any]]:
        """The records as a trainer's ``log_history`` (``step`` and ``loss``/``eval_loss``), for the loss plot."""
        return [{"step": r["current_steps"], **r} for r in self.records if "current_steps" in r]


class TrainingRun:
    """One child process at a time running ``finetune-kit train`` on a YAML the board wrote.

    ``work_dir`` receives each run's YAML and console log (never the output_dir: the trainer
    refuses a non-empty one). Example::

        run = TrainingRun(Path("board-work"))
        run.start(values)           # LLaMA-Factory keys, checked beforehand
        while run.status().active:
            time.sleep(1)
    """

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = Path(work_dir)
        self.process: subprocess.Popen[bytes] | None = None
        self.output_dir = ""
        self.config_path: Path | None = None
        self.log_path: Path | None = None
        self._log_file: IO[bytes] | None = None
        self._stop_requests = 0

    def __repr__(self) -> str:
        return f"TrainingRun({self.status().state}, output_dir={self.output_dir!r})"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, values: Mapping[str, Any]) -> Path:
        """Write ``values`` as YAML to the work folder and start training on it; returns the YAML's path."""
        if self.running:
            raise TrainingError(
                f"a training run is already going on (output_dir {self.output_dir}). Fix: wait for it to finish, "
                "or press Stop first"
            )
        self.close()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = Path(str(values["output_dir"])).name or "run"
        self.config_path = self.work_dir / f"{stamp}-{name}.yaml"
        self.config_path.write_text(to_yaml(values), encoding="utf-8")
        self.log_path = self.config_path.with_suffix(".log")
        self.output_dir = str(values["output_dir"])
        self._stop_requests = 0
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log_file = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "finetune_kit.cli.main", "train", str(self.config_path)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # Ctrl+C in the board's terminal is the board's, not the run's
        )
        return self.config_path

    def stop(self) -> bool:
        """Ask the run to save a checkpoint and stop (SIGTERM); a second call ends it at once. False if none runs."""
        if not self.running:
            return False
        assert self.process is not None
        self._stop_requests += 1
        self.process.send_signal(signal.SIGTERM)
        return True

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the child to end; its return code (None when none was started)."""
        return self.process.wait(timeout) if self.process is not None else None

    def close(self) -> None:
        """End a running child (checkpoint-saving stop, then kill after 30 s) and close the log file."""
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def status(self) -> RunStatus:
        """The run's state now, read from its trainer log and console log."""
        if self.process is None:
            return RunStatus("idle")
        code = self.process.poll()
        state: State
        if code is None:
            state = "stopping" if self._stop_requests else "running"
        elif code == 0:
            state = "finished"
        elif self._stop_requests:
            state = "stopped"
        else:
            state = "failed"
        records = read_records(Path(self.output_dir))
        last: dict[str, Any] = next((r for r in reversed(records) if "current_steps" in r), {})
        loss = next((r["loss"] for r in reversed(records) if isinstance(r.get("loss"), (int, float))), None)
        return RunStatus(
            state=state,
            output_dir=self.output_dir,
            step=int(last.get("current_steps", 0)),
            total=int(last.get("total_steps", 0)),
            elapsed=str(last.get("elapsed_time", "")),
            remaining=str(last.get("remaining_time", "")),
            loss=float(loss) if loss is not None else None,
            records=tuple(records),
            log_tail=tail(self.log_path) if self.log_path is not None else "",
            returncode=code,
        )


def read_records(output_dir: Path) -> list[dict[str, Any]]:
    """The complete lines of ``trainer_log.jsonl`` in ``output_dir`` (a line being written is left out)."""
    path = output_dir / TRAINER_LOG
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def tail(path: Path, lines: int = LOG_LINES) -> str:
    """The last ``lines`` lines of a console log, as a terminal shows them (a progress bar's redraws folded)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64_000))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    shown = []
    for line in data.split("\n"):
        redraws = [part for part in line.split("\r") if part.strip()]
        shown.append(redraws[-1].rstrip() if redraws else "")
    return "\n".join(shown[-lines:]).strip("\n")


def checkpoint_choices(output_dir: str) -> list[str]:
    """What the Resume menu offers for ``output_dir``: nothing, ``latest``, and each complete checkpoint."""
    found = [str(p) for p in checkpoints(output_dir)] if output_dir else []
    return ["", "latest", *found] if found else [""]
