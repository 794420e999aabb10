"""What a user watches: trainer_log.jsonl, the console bar, the notebook live plot, trackers and loss plots."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
from transformers import TrainerControl, TrainerState

from finetune_kit.errors import ConfigError, MissingDependencyError
from finetune_kit.train.callbacks import ConsoleProgressCallback, JsonlLogCallback, LivePlotCallback
from finetune_kit.train.metrics import Clock, duration, kind, number
from finetune_kit.train.plot import loss_figure, plot_loss
from finetune_kit.train.progress import check_trackers, console_callbacks, in_notebook

STEP_LOG = {
    "loss": 1.5,
    "grad_norm": 0.3,
    "learning_rate": 1e-4,
    "epoch": 0.25,
    "num_input_tokens_seen": 100,
    "train_runtime": 2.0,
    "train_tokens_per_second": 50.0,
}
DPO_LOG = {"rewards/chosen": 0.4, "rewards/accuracies": 0.75, "rewards/margins": 0.2, "logps/chosen": -12.0}
EVAL_LOG = {"eval_loss": 1.2, "eval_runtime": 0.5, "eval_samples_per_second": 8.0, "epoch": 0.25}
SUMMARY_LOG = {
    "train_runtime": 8.0,
    "train_samples_per_second": 2.0,
    "train_steps_per_second": 0.5,
    "total_flos": 1e9,
    "train_loss": 1.4,
    "epoch": 1.0,
    "num_input_tokens_seen": 400,
}


class FakeTime:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def state(step: int = 0, max_steps: int = 4, tokens: int = 0, *, main: bool = True) -> TrainerState:
    s = TrainerState(global_step=step, max_steps=max_steps, is_world_process_zero=main, is_local_process_zero=main)
    s.num_input_tokens_seen = tokens
    return s


def step_to(cb, s: TrainerState, step: int, logs: dict, history: bool = True) -> None:
    s.global_step = step
    s.num_input_tokens_seen = logs.get("num_input_tokens_seen", s.num_input_tokens_seen)
    cb.on_step_end(None, s, TrainerControl())
    if history:
        s.log_history.append({**logs, "step": step})
    cb.on_log(None, s, TrainerControl(), logs=dict(logs))


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


def test_jsonl_has_llamafactory_fields_throughput_and_preference_metrics(tmp_path):
    clock = FakeTime()
    cb = JsonlLogCallback(tmp_path, clock=Clock(clock))
    s = state()
    cb.on_train_begin(None, s, TrainerControl())
    clock.t += 2.0
    step_to(cb, s, 1, {**STEP_LOG, **DPO_LOG})
    clock.t += 1.0
    step_to(cb, s, 2, {**STEP_LOG, "loss": 1.4, "num_input_tokens_seen": 300})
    cb.on_evaluate(None, s, TrainerControl())
    step_to(cb, s, 2, EVAL_LOG)
    first, second, evaluation = read_log(tmp_path)
    assert first["current_steps"] == 1 and first["total_steps"] == 4 and first["percentage"] == 25.0
    assert first["loss"] == 1.5 and first["lr"] == first["learning_rate"] == 1e-4 and first["grad_norm"] == 0.3
    assert first["elapsed_time"] == "0:00:02" and first["remaining_time"] == "0:00:06"  # LLaMA-Factory's H:MM:SS
    assert first["total_tokens"] == first["num_input_tokens_seen"] == 100
    assert first["throughput"] == 50.0 and first["tokens_per_second"] == 50.0
    assert first["accuracy"] == 0.75 and first["rewards/margins"] == 0.2 and first["logps/chosen"] == -12.0
    assert second["throughput"] == 100.0 and second["tokens_per_second"] == 200.0  # since start, since last log
    assert "loss" not in evaluation and evaluation["eval_loss"] == 1.2 and evaluation["current_steps"] == 2


def test_jsonl_restarts_on_a_fresh_run_and_appends_on_resume(tmp_path):
    (tmp_path / "trainer_log.jsonl").write_text('{"current_steps": 2}\n')
    JsonlLogCallback(tmp_path).on_train_begin(None, state(step=2), TrainerControl())
    assert len(read_log(tmp_path)) == 1
    JsonlLogCallback(tmp_path).on_train_begin(None, state(step=0), TrainerControl())
    assert not (tmp_path / "trainer_log.jsonl").exists()


def test_only_the_main_process_writes_and_prints(tmp_path, capsys):
    s = state(main=False)
    for cb in (JsonlLogCallback(tmp_path), ConsoleProgressCallback(), ConsoleProgressCallback(bar=False)):
        cb.on_train_begin(None, s, TrainerControl())
        step_to(cb, s, 1, STEP_LOG)
        cb.on_train_end(None, s, TrainerControl())
    assert not (tmp_path / "trainer_log.jsonl").exists()
    assert capsys.readouterr() == ("", "")


def test_console_shows_one_bar_with_loss_and_readable_eval_and_summary_lines(capsys):
    clock = FakeTime()
    cb = ConsoleProgressCallback(clock=Clock(clock))
    s = state()
    cb.on_train_begin(None, s, TrainerControl())
    clock.t += 1.0
    step_to(cb, s, 1, STEP_LOG)
    step_to(cb, s, 2, {**STEP_LOG, **DPO_LOG, "num_input_tokens_seen": 200})
    step_to(cb, s, 2, EVAL_LOG)
    step_to(cb, s, 4, SUMMARY_LOG)
    cb.on_train_end(None, s, TrainerControl())
    out, err = capsys.readouterr()
    assert "{'" not in out + err and "{'" not in err
    assert "Training: 100%" in err and "4/4" in err
    assert "loss=1.5, lr=1.00e-04, grad_norm=0.3, acc=0.75, margin=0.2" in err
    assert "eval @ step 2/4 | loss 1.2 | 0.50 s" in out
    assert out.strip().splitlines()[-1] == (
        "training done: 4 steps | train_loss 1.4 | runtime 8.0 s | 2 samples/s | 0.5 steps/s | 400 tokens"
    )


def test_disable_tqdm_prints_one_readable_line_per_log(capsys):
    clock = FakeTime()
    cb = ConsoleProgressCallback(bar=False, clock=Clock(clock))
    s = state()
    cb.on_train_begin(None, s, TrainerControl())
    clock.t += 2.0
    step_to(cb, s, 1, STEP_LOG)
    out, err = capsys.readouterr()
    assert err == ""
    assert out == (
        "step 1/4 (25%) | loss 1.5 | grad_norm 0.3 | lr 1.00e-04 | 50 tok/s | epoch 0.25"
        " | 0:00:02 elapsed, ETA 0:00:06\n"
    )


def test_numbers_read_like_a_person_writes_them():
    assert [number(v, k) for k, v in [("loss", 10.8241), ("learning_rate", 2e-4), ("grad_norm", 3e-5)]] == [
        "10.82",
        "2.00e-04",
        "3.00e-05",
    ]
    assert number(12345, "num_input_tokens_seen") == "12,345" and duration(3725.9) == "1:02:05"
    assert [kind(x) for x in (STEP_LOG, EVAL_LOG, SUMMARY_LOG, {"custom": 1.0})] == [
        "train",
        "eval",
        "summary",
        "other",
    ]


class Recorder:
    """Stands in for ``IPython.display.display``: every display call and every in-place update."""

    def __init__(self) -> None:
        self.shown: list = []
        self.updates: list[tuple[int, object]] = []

    def __call__(self, obj, display_id=None):
        assert display_id is True
        self.shown.append(obj)
        return Handle(self, len(self.shown) - 1)


class Handle:
    def __init__(self, recorder: Recorder, index: int) -> None:
        self.recorder, self.index = recorder, index

    def update(self, obj) -> None:
        self.recorder.updates.append((self.index, obj))


def test_notebook_live_plot_updates_one_figure_in_place_and_throttles(monkeypatch):
    import IPython.display
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recorder = Recorder()
    monkeypatch.setattr(IPython.display, "display", recorder)
    clock = FakeTime()
    cb = LivePlotCallback(interval=0.5, now=clock)
    s = state(max_steps=20)
    cb.on_train_begin(None, s, TrainerControl())
    for step in range(1, 11):  # ten logs within 0.45 s: drawn once, at the first
        clock.t += 0.045
        step_to(cb, s, step, {**STEP_LOG, "loss": 2.0 - step / 10, "num_input_tokens_seen": 100 * step})
    clock.t += 1.0
    step_to(cb, s, 11, {**STEP_LOG, "loss": 0.9})
    step_to(cb, s, 11, EVAL_LOG)  # an evaluation is drawn at once
    step_to(cb, s, 20, SUMMARY_LOG)
    cb.on_train_end(None, s, TrainerControl())

    status, plot = recorder.shown  # displayed once each, then only updated
    assert repr(status).startswith("step 0/20") and "<pre" in status._repr_html_()
    assert isinstance(plot, IPython.display.Image) and plot.data[:4] == b"\x89PNG"
    plot_updates = [new for i, new in recorder.updates if i == 1]
    assert 2 <= len(plot_updates) <= 4 and all(u.data[:4] == b"\x89PNG" for u in plot_updates)
    texts = [repr(new) for i, new in recorder.updates if i == 0]
    assert any("step 11/20" in t and "loss 0.9" in t and "eval_loss 1.2" in t and "ETA" in t for t in texts)
    assert texts[-1].startswith("training done: 20 steps")
    assert plt.get_fignums() == []  # no pyplot figure left behind to be shown twice by the inline backend


def test_console_callbacks_swaps_transformers_display_callbacks(tmp_path, monkeypatch):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.utils.notebook import NotebookProgressCallback

    add, remove = console_callbacks(tmp_path)  # IPython is imported here: transformers may pick its notebook bar
    assert [type(c) for c in add] == [JsonlLogCallback, ConsoleProgressCallback] and add[1].use_bar
    assert set(remove) == {ProgressCallback, PrinterCallback, NotebookProgressCallback}
    assert not any(isinstance(c, cls) for c in add for cls in remove)  # remove_callback never hits ours
    assert type(console_callbacks(tmp_path, notebook=True)[0][1]) is LivePlotCallback
    plain = console_callbacks(tmp_path, notebook=True, disable_tqdm=True)[0][1]
    assert type(plain) is ConsoleProgressCallback and not plain.use_bar
    monkeypatch.delitem(sys.modules, "IPython")  # no IPython loaded: no notebook bar to remove, none imported
    assert set(console_callbacks(tmp_path)[1]) == {ProgressCallback, PrinterCallback}


def test_in_notebook_detects_a_jupyter_kernel(monkeypatch):
    assert not in_notebook()  # pytest is no kernel
    ZMQInteractiveShell = type("ZMQInteractiveShell", (), {"config": {}})
    fake = types.SimpleNamespace(get_ipython=ZMQInteractiveShell)
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert in_notebook()
    monkeypatch.setattr(fake, "get_ipython", lambda: None)  # IPython imported, no shell
    assert not in_notebook()


def test_check_trackers_names_the_pip_command(monkeypatch):
    check_trackers(("none",))
    check_trackers(("tensorboard",))  # installed here
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(MissingDependencyError, match="report_to: wandb.*pip install wandb"):
        check_trackers(("tensorboard", "wandb"))
    with pytest.raises(ConfigError, match="'wandbb'.*Did you mean 'wandb'"):
        check_trackers(("wandbb",))


def test_plot_loss_writes_one_file_per_key_without_touching_pyplot(tmp_path):
    import matplotlib.pyplot as plt

    history = [{"loss": 2.0 - i / 10, "step": i} for i in range(1, 30)] + [{"eval_loss": 1.5, "step": 10}]
    history.append({"rewards/accuracies": 0.5, "step": 10})
    written = plot_loss(history, tmp_path, keys=("loss", "eval_loss", "rewards/accuracies", "grad_norm"))
    names = ["training_loss.png", "training_eval_loss.png", "training_rewards_accuracies.png"]
    assert written == [tmp_path / n for n in names]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)
    fig = loss_figure(history)
    assert [line.get_label() for line in fig.axes[0].lines] == ["loss (original)", "loss (smoothed)", "eval_loss"]
    assert plt.get_fignums() == []


def test_a_real_run_logs_jsonl_console_and_tensorboard(tiny_llama_dir, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from finetune_kit import DatasetRegistry, LoraTrainer, ModelSource

    rows = [{"instruction": f"What is {i} + {i}?", "input": "", "output": f"{i} + {i} = {2 * i}."} for i in range(4)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sums.json").write_text(json.dumps(rows))
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"sums": {"file_name": "sums.json"}}))
    data = DatasetRegistry.from_dir(tmp_path / "data").load("sums")
    out = tmp_path / "out"
    trainer = (
        LoraTrainer(ModelSource.local(tiny_llama_dir))
        .with_lora(lora_rank=4)
        .with_data(cutoff_len=64)
        .with_training(
            output_dir=str(out),
            learning_rate=1e-2,
            max_steps=4,
            per_device_train_batch_size=2,
            logging_steps=1,
            eval_steps=2,
            save_steps=1000,
            report_to="tensorboard",
        )
    )
    capsys.readouterr()
    trainer.train(data, eval_data=data)

    log = read_log(out)
    steps = [r for r in log if "loss" in r]
    assert [r["current_steps"] for r in steps] == [1, 2, 3, 4]
    assert all(r["grad_norm"] > 0 and r["tokens_per_second"] > 0 and r["throughput"] > 0 for r in steps)
    assert steps[-1]["total_tokens"] == steps[-1]["num_input_tokens_seen"] > 0 and steps[-1]["percentage"] == 100.0
    assert [r["current_steps"] for r in log if "eval_loss" in r][:2] == [2, 4]
    assert any("train_loss" in r for r in log)

    captured = capsys.readouterr()
    assert "{'" not in captured.out + captured.err  # no raw dict anywhere
    assert "loss=" in captured.err and "tok/s=" in captured.err and "4/4" in captured.err
    assert "eval @ step 2/4 | loss" in captured.out and "training done: 4 steps | train_loss" in captured.out

    (run_dir,) = out.glob("runs/*")  # transformers' default logging dir: output_dir/runs/<date>_<host>
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert "eval/loss" in acc.Tags()["scalars"]
