"""Training from the board runs `finetune-kit train` in a child process: its progress is read from the files it
writes, Stop saves a checkpoint, and Resume goes on from it to the end (tiny random model, a few seconds a run)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from finetune_kit import TrainingError
from finetune_kit.webui import form, tasks
from finetune_kit.webui.form import DEMO_DATA
from finetune_kit.webui.runner import TrainingRun, checkpoint_choices, read_records, tail
from finetune_kit.webui.ui_train import loss_plot, status_text


def run_values(model: Path, out: Path, **changes) -> dict:
    values = form.defaults()
    values.update(
        model_name_or_path=str(model),
        template="chatml",
        dataset=["shop_alpaca"],
        dataset_dir=str(DEMO_DATA),
        output_dir=str(out),
        cutoff_len=64,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        logging_steps=1,
        learning_rate=1e-3,
    )
    values.update(changes)
    result = form.form_values(values)
    form.check(result)
    return result


def wait_until(predicate, timeout: float = 240.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.2)


def test_a_run_is_watched_stopped_with_a_checkpoint_and_resumed_to_the_end(tiny_llama_dir: Path, tmp_path: Path):
    run = TrainingRun(tmp_path / "board")
    out = tmp_path / "run"
    assert run.status().state == "idle"
    config = run.start(run_values(tiny_llama_dir, out, max_steps=400, save_steps=1000))
    try:
        assert config.parent == tmp_path / "board" and config.read_text(encoding="utf-8").startswith("### model")
        with pytest.raises(TrainingError, match="already going on"):
            run.start(run_values(tiny_llama_dir, out))
        wait_until(lambda: run.status().step >= 2)
        now = run.status()
        assert now.state == "running" and now.total == 400 and now.loss is not None and now.elapsed
        assert re.search(r"^Training · step \d+/400 \(\d+%\) · loss \d+\.\d{4} · elapsed ", status_text(now, "en"))
        assert "训练中" in status_text(now, "zh")
        assert loss_plot(now).axes[0].get_xlim()[1] == 400
        assert run.stop()
        assert run.wait(120) != 0
    finally:
        run.close()
    stopped = run.status()
    assert stopped.state == "stopped"
    last = checkpoint_choices(str(out))
    assert last[:2] == ["", "latest"] and Path(last[-1]).name.startswith("checkpoint-")
    steps_before = int(Path(last[-1]).name.split("-")[1])
    assert "Stopped" in status_text(stopped, "en")
    # a stopped run's folder is refused unless the user resumes (or overwrites)
    with pytest.raises(Exception, match="Fix: choose 'latest'"):
        form.check_output_dir(run_values(tiny_llama_dir, out, max_steps=steps_before + 2))

    resumed = run_values(tiny_llama_dir, out, max_steps=steps_before + 2, resume_from_checkpoint="latest")
    form.check_output_dir(resumed)
    run.start(resumed)
    try:
        assert run.wait(240) == 0
    finally:
        run.close()
    done = run.status()
    assert done.state == "finished" and done.step == done.total == steps_before + 2
    assert [r["current_steps"] for r in done.records if "loss" in r][-2:] == [steps_before + 1, steps_before + 2]
    assert tasks.adapter_for_output(done.output_dir) == str(out)
    assert "Finished" in status_text(done, "en")


def test_a_failing_run_says_so_and_shows_the_log(tmp_path: Path):
    run = TrainingRun(tmp_path / "board")
    values = form.form_values({**form.defaults(), "model_name_or_path": str(tmp_path / "no-model"), "dataset": ["x"]})
    values["output_dir"] = str(tmp_path / "run")
    run.start(values)
    try:
        assert run.wait(120) == 1
    finally:
        run.close()
    status = run.status()
    assert status.state == "failed" and status.returncode == 1
    assert "is neither an existing path nor a hub id" in status.log_tail
    assert "exit code 1" in status_text(status, "en")


def test_the_log_tail_folds_progress_bar_redraws(tmp_path: Path):
    log = tmp_path / "run.log"
    log.write_bytes(b"loading\nTraining:  0%|\rTraining: 50%|\rTraining: 100%|\r\ndone\n")
    assert tail(log) == "loading\nTraining: 100%|\ndone"
    assert tail(tmp_path / "missing.log") == ""


def test_a_line_being_written_is_left_out(tmp_path: Path):
    (tmp_path / "trainer_log.jsonl").write_text(
        json.dumps({"current_steps": 1, "total_steps": 4, "loss": 2.0}) + '\n{"current_steps": 2, "lo', encoding="utf-8"
    )
    assert read_records(tmp_path) == [{"current_steps": 1, "total_steps": 4, "loss": 2.0}]
    assert read_records(tmp_path / "nothing") == []
