"""Crash safety: a killed run resumes exactly, saves are atomic, signals stop cleanly, NaN is caught.

The killed runs are real processes (``_crash_train.py``) stopped with SIGKILL or SIGTERM; every
resume must repeat the uninterrupted run's per-step losses exactly (CPU, fp32, LoRA dropout on,
so the RNG state matters as much as the optimizer, scheduler and data position).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from finetune_kit.errors import FinetuneKitWarning, TrainingError, TrainingInterrupted
from finetune_kit.train.safety import (
    guard_signals,
    last_checkpoint,
    rotate,
    training_error,
)

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "_crash_train.py"
_spec = importlib.util.spec_from_file_location("_crash_train", SCRIPT)
assert _spec is not None and _spec.loader is not None
crash = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(crash)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return crash.write_data(tmp_path_factory.mktemp("crash-data"))


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The uninterrupted run's output folder, by settings (each run once)."""
    done: dict[str, Path] = {}

    def run(**training) -> Path:
        key = json.dumps(training, sort_keys=True)
        if key not in done:
            done[key] = tmp_path_factory.mktemp("reference") / "out"
            crash.train(tiny_llama_dir, data_dir, done[key], **training)
        return done[key]

    return run


def losses(out: Path) -> dict[int, float]:
    """Step -> loss from the run's trainer_state.json (logging_steps 1)."""
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: e["loss"] for e in history if "loss" in e}


def spawn(model: Path, data: Path, out: Path, training: dict, **env: str) -> subprocess.Popen:
    """Start ``_crash_train.py`` on this checkout; its output goes to ``log(out)``."""
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    environ["PYTHONPATH"] = os.pathsep.join([str(HERE.parent.parent), environ.get("PYTHONPATH", "")])
    args = [sys.executable, str(SCRIPT), str(model), str(data), str(out), json.dumps(training)]
    with log(out).open("w") as sink:
        return subprocess.Popen(args, env=environ, stdout=sink, stderr=subprocess.STDOUT)


def log(out: Path) -> Path:
    return out.with_name(out.name + ".log")


def wait_paused(proc: subprocess.Popen, out: Path, timeout: float = 120) -> Path:
    """Wait until the script is paused before a step (CRASH_PAUSE_AT); return the marker it waits on."""
    marker = out.with_name(out.name + ".paused")
    deadline = time.time() + timeout
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the training script never paused (exit {proc.wait()}):\n{log(out).read_text()[-3000:]}")
        time.sleep(0.05)
    return marker


def assert_same_run(out: Path, reference: Path) -> None:
    """Same per-step losses and final adapter as the uninterrupted run: bit-exact on CPU (CUDA kernels
    may reorder float sums, so a GPU run gets a tight tolerance)."""
    got, expected = losses(out), losses(reference)
    assert sorted(got) == sorted(expected) == list(range(1, crash.SETTINGS["max_steps"] + 1))
    weights = [load_file(o / "adapter_model.safetensors") for o in (out, reference)]
    if torch.cuda.is_available():
        assert got == pytest.approx(expected, rel=1e-5)
        for k in weights[1]:
            torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-5, atol=1e-7)
    else:
        assert got == expected
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])


def resume(model: Path, data: Path, out: Path, expected: str, **training):
    with pytest.warns(FinetuneKitWarning, match=f"Resuming training from .*{expected}"):
        return crash.train(model, data, out, **training)


def test_kill_9_after_a_step_then_resume_repeats_the_uninterrupted_losses(
    tiny_llama_dir, data_dir, reference, tmp_path
):
    # batch 1 x 2 accumulation, 3 steps an epoch: checkpoint-2 is mid-epoch (the data position matters)
    # and the resumed run crosses into the next epoch
    training = {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 1}
    out = tmp_path / "out"
    expected = reference(**training)
    proc = spawn(tiny_llama_dir, data_dir, out, training, CRASH_PAUSE_AT="3")
    wait_paused(proc, out)  # step 3 is done and logged, but not checkpointed
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert last_checkpoint(out) == str(out / "checkpoint-2")
    assert not (out / "checkpoint-4").exists()
    resume(tiny_llama_dir, data_dir, out, "checkpoint-2", **training)
    assert_same_run(out, expected)


def test_kill_9_during_a_save_keeps_the_previous_checkpoint_and_resumes_exactly(
    tiny_llama_dir, data_dir, reference, tmp_path
):
    out = tmp_path / "out"
    expected = reference()
    proc = spawn(tiny_llama_dir, data_dir, out, {}, CRASH_KILL_IN_SAVE="4")
    assert proc.wait(timeout=120) == -signal.SIGKILL, log(out).read_text()[-3000:]
    staged = out / ".tmp-checkpoint-4" / "checkpoint-4"
    assert (staged / "adapter_model.safetensors").is_file()  # killed halfway through writing checkpoint-4
    assert not (staged / "trainer_state.json").exists() and not (out / "checkpoint-4").exists()
    partial = out / "checkpoint-5"  # what a save killed before atomic saves left behind
    partial.mkdir()
    (partial / "README.md").write_text("partial")
    assert last_checkpoint(out) == str(out / "checkpoint-2")

    resume(tiny_llama_dir, data_dir, out, "checkpoint-2", save_total_limit=2)
    assert_same_run(out, expected)  # steps 3 and 4 were lost and are repeated exactly
    # the stale staging folder is gone, the partial checkpoint-5 replaced (the final save), the oldest rotated away
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-4", "checkpoint-5"]
    assert last_checkpoint(out) == str(out / "checkpoint-5")


def test_sigterm_saves_a_checkpoint_stops_and_resumes_exactly(
    tiny_llama_dir, data_dir, reference, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    crash.install_seams(out, signal_at=3, patch=monkeypatch.setattr)  # SIGTERM to this very process
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM after step 3 of 5") as stopped:
        crash.train(tiny_llama_dir, data_dir, out, save_steps=100)  # any checkpoint is the signal's doing
    assert stopped.value.exit_code == 128 + signal.SIGTERM and "checkpoint-3" in str(stopped.value)
    assert signal.getsignal(signal.SIGTERM) == before
    assert last_checkpoint(out) == str(out / "checkpoint-3")
    assert not (out / "adapter_model.safetensors").exists()  # a stopped run is not a finished one
    monkeypatch.undo()  # checkpoint-3 ends an epoch: this resume takes the other path of transformers' data skipping
    resume(tiny_llama_dir, data_dir, out, "checkpoint-3", save_steps=100)
    assert_same_run(out, reference())


def test_rotation_never_deletes_the_newest_complete_checkpoint(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if step != 8:  # checkpoint-8 is partial: no trainer_state.json
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / ".tmp-checkpoint-10").mkdir()
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")
    rotate(tmp_path, 1, keep=(tmp_path / "checkpoint-6", tmp_path / "checkpoint-2"))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".tmp-checkpoint-10", "checkpoint-2", "checkpoint-6", "checkpoint-8"]


def _nan_at(step: int, *, gradient_only: bool = False):
    """A ``Trainer.compute_loss`` whose loss (or only its gradient) is non-finite at ``step``."""
    from transformers import Trainer

    original = Trainer.compute_loss

    def compute_loss(trainer, *args, **kwargs):
        loss = original(trainer, *args, **kwargs)
        if trainer.state.global_step + 1 != step:
            return loss
        return _InfGradient.apply(loss) if gradient_only else loss * float("nan")

    return compute_loss


class _InfGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_nonfinite_loss_stops_naming_the_step_and_the_last_good_checkpoint(
    tiny_llama_dir, data_dir, tmp_path, monkeypatch
):
    from transformers import Trainer

    monkeypatch.setattr(Trainer, "compute_loss", _nan_at(3))
    out = tmp_path / "out"
    with pytest.raises(TrainingError, match=r"step 3: the loss is not finite.*checkpoint-2 \(kept"):
        crash.train(tiny_llama_dir, data_dir, out)
    assert last_checkpoint(out) == str(out / "checkpoint-2")
    assert not (out / "checkpoint-3").exists() and not (out / "adapter_model.safetensors").exists()

    monkeypatch.undo()  # the next run resumes from checkpoint-2; a damaged file there is named with the fix
    (out / "checkpoint-2" / "optimizer.pt").write_bytes(b"not a torch file")
    with pytest.raises(TrainingError, match=r"Could not resume from .*checkpoint-2.*delete"):
        resume(tiny_llama_dir, data_dir, out, "checkpoint-2")


def test_nonfinite_gradient_is_skipped_with_a_warning(tiny_llama_dir, data_dir, tmp_path, monkeypatch):
    from transformers import Trainer

    monkeypatch.setattr(Trainer, "compute_loss", _nan_at(2, gradient_only=True))
    out = tmp_path / "out"
    with pytest.warns(FinetuneKitWarning, match="step 2: the gradient norm is not finite; skipped"):
        crash.train(tiny_llama_dir, data_dir, out, max_steps=3, save_steps=1, nonfinite_loss="skip")
    weights = {s: load_file(out / f"checkpoint-{s}" / "adapter_model.safetensors") for s in (1, 2, 3)}
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])  # step 2 changed nothing
    assert any(not torch.equal(weights[2][k], weights[3][k]) for k in weights[2])  # step 3 trained again
    assert all(torch.isfinite(v).all() for v in weights[3].values())
    assert sorted(losses(out)) == [1, 2, 3]


def test_training_error_names_the_problem_and_the_fix(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}")
    oom = training_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), out=tmp_path, step=7)
    assert isinstance(oom, TrainingError)
    text = str(oom)
    assert "out of GPU memory at step 7" in text and "checkpoint-3" in text
    for fix in ("per_device_train_batch_size", "cutoff_len", "gradient_checkpointing: true", "quantization_bit: 4"):
        assert fix in text
    assert "quantization_bit: 4" in str(training_error(torch.OutOfMemoryError("boom"), out=tmp_path))

    broken = training_error(ValueError("Can't find a valid checkpoint at out/checkpoint-8"), out=tmp_path)
    assert "Could not resume from out/checkpoint-8" in str(broken) and "delete out/checkpoint-8" in str(broken)
    loading = training_error(EOFError("Ran out of input"), out=tmp_path, resuming="run/checkpoint-5")
    assert "Could not resume from run/checkpoint-5" in str(loading) and "resume_from_checkpoint" in str(loading)

    dtype = training_error(RuntimeError("expected scalar type BFloat16 but found Float"), out=tmp_path, step=1)
    assert "dtype" in str(dtype) and "bf16: false" in str(dtype) and "checkpoint-3" in str(dtype)

    other = str(training_error(KeyError("input_ids"), out=tmp_path, step=2))
    assert "KeyError: 'input_ids'" in other and "FINETUNE_KIT_TRACEBACK=1" in other
    already = TrainingError("readable")
    assert training_error(already, out=tmp_path) is already


def _fake_trainer(tmp_path: Path) -> SimpleNamespace:
    callbacks: list = []
    return SimpleNamespace(
        state=SimpleNamespace(global_step=0, max_steps=10),
        args=SimpleNamespace(output_dir=str(tmp_path)),
        callbacks=callbacks,
        add_callback=callbacks.append,
        remove_callback=callbacks.remove,
    )


def test_sigint_asks_for_a_save_and_a_second_sigint_interrupts_at_once(tmp_path):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    trainer = _fake_trainer(tmp_path)
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    with pytest.raises(TrainingInterrupted, match="stopped by SIGINT after step 3 of 10") as stopped:
        with guard_signals(trainer):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            trainer.state.global_step = 3
            trainer.callbacks[0].on_step_end(trainer.args, trainer.state, control)
    assert control.should_save and control.should_training_stop
    assert stopped.value.exit_code == 130 and not trainer.callbacks
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before

    with pytest.raises(KeyboardInterrupt):
        with guard_signals(_fake_trainer(tmp_path)):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
            pytest.fail("the second SIGINT did not interrupt")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
