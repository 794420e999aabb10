"""Crash safety of a training run: atomic checkpoints, signals, non-finite losses, readable errors.

:class:`SafeTrainerMixin`, in front of ``transformers.Trainer`` or a TRL trainer, writes every
``checkpoint-N`` into ``.tmp-checkpoint-N`` and renames it when complete (a ``kill -9`` during a
save leaves the previous checkpoint to resume from), stops (or skips the update) at a NaN/inf
loss or gradient norm before the update is applied, and makes training errors readable
(:func:`training_error`). :func:`guard_signals` turns SIGTERM/SIGINT into "save at the end of
this step and stop". A resumed run repeats the uninterrupted run's losses exactly: transformers
restores optimizer, scheduler, RNG and data position, from a checkpoint that is always whole.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import signal
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_kit.errors import FinetuneKitError, FinetuneKitWarning, TrainingError, TrainingInterrupted
from finetune_kit.train.distributed import LAUNCH_RECORD, launch_record

logger = logging.getLogger("finetune_kit.train")

CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR
STAGING_PREFIX = ".tmp-"  # a checkpoint being written: .tmp-checkpoint-N/checkpoint-N
_ASIDE_PREFIX = ".old-"  # a same-named checkpoint being replaced
_CHECKPOINT = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")
_STATE_FILE = "trainer_state.json"  # written last by Trainer._save_checkpoint; a resume needs it

if TYPE_CHECKING:
    _TrainerBase = Any  # the mixin calls the trainer's methods through super()
else:
    _TrainerBase = object


class SafeTrainerMixin(_TrainerBase):
    """Mixed in front of ``transformers.Trainer`` (or a TRL trainer): crash-safe checkpoints.

    Example::

        cls = type("SafeTrainer", (SafeTrainerMixin, Trainer), {})
        hf = cls(model=model, args=args, train_dataset=data)
        hf.nonfinite_loss = "skip"          # or "stop" (the default)
        hf.finetune_kit_output = Path(args.output_dir)
        with guard_signals(hf):
            hf.train(resume_from_checkpoint=last_checkpoint(hf.finetune_kit_output))
    """

    nonfinite_loss: str = "stop"
    finetune_kit_output: Path | None = None
    _fk_staging: str | None = None
    _fk_bad_loss: Any = None  # whether a loss since the last optimizer step was NaN/inf (a device tensor)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; ``True`` resumes from the last *complete* checkpoint; errors come out readable."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_checkpoint(self._fk_out()) or True  # none: transformers says so
        self._fk_resume = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        self._fk_stepped, self._fk_bad_loss = False, None
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        except FinetuneKitError:
            raise
        except Exception as exc:
            loading = self._fk_resume if not self._fk_stepped else None
            raise training_error(exc, out=self._fk_out(), step=self.state.global_step + 1, resuming=loading) from exc

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """One forward/backward; remembers (without a device sync) whether its loss was finite."""
        import torch

        self._fk_stepped = True
        loss = super().training_step(*args, **kwargs)
        bad = ~torch.isfinite(loss.detach()).all()
        self._fk_bad_loss = bad if self._fk_bad_loss is None else self._fk_bad_loss | bad
        return loss

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        # Called once per optimizer step, after clipping and right before optimizer.step():
        # the one place that sees both the accumulated losses and the gradient norm in time.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        what = self._fk_nonfinite(grad_norm)
        if what is None:
            return grad_norm
        step = self.state.global_step + 1
        if self.nonfinite_loss == "skip" and not getattr(self, "is_deepspeed_enabled", False):
            model.zero_grad(set_to_none=True)  # optimizers leave parameters without a gradient untouched
            warnings.warn(
                f"step {step}: the {what} is not finite; skipped this batch's update (nonfinite_loss: skip)",
                FinetuneKitWarning,
                stacklevel=2,
            )
            return None  # no NaN in the logs
        checkpoint = last_checkpoint(self._fk_out())
        kept = (
            f"The last good checkpoint is {checkpoint} (kept; this step's state was not saved)."
            if checkpoint
            else "No checkpoint had been saved yet."
        )
        raise TrainingError(
            f"Training stopped at step {step}: the {what} is not finite (NaN or inf). {kept} Fix: lower "
            "learning_rate, keep max_grad_norm > 0, prefer bf16 to fp16, check that step's data, or set "
            "nonfinite_loss: skip to skip such updates."
        )

    def _fk_nonfinite(self, grad_norm: Any) -> str | None:
        """``"loss"``, ``"gradient norm"`` or None, agreed by every process (one device sync per step)."""
        import torch

        bad_loss, self._fk_bad_loss = self._fk_bad_loss, None
        device = bad_loss.device if bad_loss is not None else self.args.device
        flags = torch.zeros(2, device=device)
        if bad_loss is not None:
            flags[0] = bad_loss.float()
        # fp16 with a grad scaler overflows now and then by design: the scaler skips those steps
        if grad_norm is not None and getattr(self.accelerator, "scaler", None) is None:
            flags[1] = (~torch.isfinite(torch.as_tensor(grad_norm, device=device, dtype=torch.float32))).float()
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="max")
        loss_bad, norm_bad = flags.tolist()
        return "loss" if loss_bad else "gradient norm" if norm_bad else None

    def _get_output_dir(self, trial: Any) -> str:
        return self._fk_staging if self._fk_staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Write ``checkpoint-N`` into ``.tmp-checkpoint-N`` and rename it when complete; then rotate."""
        run_dir = Path(self._get_output_dir(trial))
        name = f"{CHECKPOINT_PREFIX}-{self.state.global_step}"
        staging = run_dir / f"{STAGING_PREFIX}{name}"
        if self.args.should_save:
            remove_stale(run_dir)
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self._fk_staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)  # a TRL override runs inside, writing to the staging folder
        finally:
            self._fk_staging = None
        final = run_dir / name
        if self.args.should_save:
            (staging / name / LAUNCH_RECORD).write_text(json.dumps(launch_record(self.args)), encoding="utf-8")
        best = self.state.best_model_checkpoint
        if best is not None and Path(best).parent == staging:  # the best is this step: name its final place
            self.state.best_model_checkpoint = str(final)
            if self.args.should_save:
                self.state.save_to_json(str(staging / name / _STATE_FILE))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            _publish(staging / name, final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate(run_dir, self.args.save_total_limit, keep=(final, self.state.best_model_checkpoint))
        self.accelerator.wait_for_everyone()

    def _fk_out(self) -> Path:
        return Path(self.finetune_kit_output or self.args.output_dir)


@contextmanager
def guard_signals(trainer: Any) -> Iterator[None]:
    """While training: SIGTERM/SIGINT save a checkpoint at the end of the current step and stop.

    A second signal acts at once (SIGINT raises ``KeyboardInterrupt``). On leaving, the old
    handlers are back; a run that was stopped early raises :class:`TrainingInterrupted` naming
    the checkpoint to resume from. Outside the main thread nothing is installed. Example::

        with guard_signals(hf):
            hf.train()
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = [signal.SIGINT, signal.SIGTERM]
    stop = _SignalStop(trainer, {s: signal.getsignal(s) for s in signums})
    callback = _stop_callback(stop)
    trainer.add_callback(callback)
    for s in signums:
        signal.signal(s, stop.handle)
    try:
        yield
    finally:
        for s, old in stop.previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        trainer.remove_callback(callback)
    state = trainer.state
    if stop.stopped_at is not None and state.global_step < state.max_steps:
        signum = stop.signum or signal.SIGTERM
        checkpoint = last_checkpoint(Path(getattr(trainer, "finetune_kit_output", None) or trainer.args.output_dir))
        raise TrainingInterrupted(
            f"Training stopped by {signal.Signals(signum).name} after step {state.global_step} of {state.max_steps}; "
            f"checkpoint saved to {checkpoint}. Run the same training again (same output_dir) to resume from it.",
            signum=signum,
            checkpoint=checkpoint,
        )


class _SignalStop:
    """The first signal asks for a save-and-stop; the second gets the old behaviour at once."""

    def __init__(self, trainer: Any, previous: dict[signal.Signals, Any]) -> None:
        self.trainer, self.previous = trainer, previous
        self.signum: int | None = None
        self.stopped_at: int | None = None

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum is None and getattr(self.trainer, "is_in_train", True):  # else no step end would come
            self.signum = signum
            logger.warning(
                "%s received: saving a checkpoint at the end of step %d, then stopping (send it again to stop now)",
                signal.Signals(signum).name,
                self.trainer.state.global_step + 1,
            )
            return
        old = self.previous.get(signal.Signals(signum))
        signal.signal(signum, old if old is not None else signal.SIG_DFL)
        if callable(old):
            old(signum, frame)
        elif old != signal.SIG_IGN:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)  # the default action, now that the default handler is back

    def requested(self) -> bool:
        """Whether any process got a signal (every process stops at the same step)."""
        asked = self.signum is not None
        accelerator = getattr(self.trainer, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1:
            import torch

            flag = torch.tensor([1.0 if asked else 0.0], device=accelerator.device)
            asked = bool(accelerator.reduce(flag, reduction="max").item())
        return asked


def _stop_callback(stop: _SignalStop) -> Any:
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        """Turns a pending signal into "save this step and stop"."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if stop.requested():
                control.should_save = control.should_training_stop = True
                stop.stopped_at = state.global_step

    return StopOnSignal()


def is_complete_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a readable ``trainer_state.json`` (written last, so the rest is there)."""
    try:
        json.loads((folder / _STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def checkpoints(out: Path | str) -> list[Path]:
    """The complete ``checkpoint-N`` folders in ``out``, lowest N first (temporary and partial ones left out)."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if is_complete_checkpoint(p)]


def last_checkpoint(out: Path | str) -> str | None:
    """The complete ``checkpoint-N`` folder with the highest N in ``out``, if any.

    Example: ``last_checkpoint(Path("saves/run"))`` -> ``"saves/run/checkpoint-8"``, or None.
    """
    found = checkpoints(out)
    return str(found[-1]) if found else None


def remove_stale(out: Path) -> None:
    """Delete what interrupted saves left behind: ``.tmp-checkpoint-*`` and ``.old-checkpoint-*`` folders."""
    if not out.is_dir():
        return
    for p in out.iterdir():
        if p.name.startswith((f"{STAGING_PREFIX}{CHECKPOINT_PREFIX}-", f"{_ASIDE_PREFIX}{CHECKPOINT_PREFIX}-")):
            shutil.rmtree(p, ignore_errors=True)


def rotate(out: Path, limit: int | None, *, keep: tuple[Path | str | None, ...] = ()) -> None:
    """Delete the oldest complete checkpoints beyond ``limit``; never ``keep`` (the newest, the best)."""
    if not limit or limit <= 0:
        return
    protected = {Path(k).resolve() for k in keep if k}
    complete = checkpoints(out)
    excess = len(complete) - max(limit, len(protected & {p.resolve() for p in complete}))
    for p in complete:
        if excess <= 0:
            break
        if p.resolve() not in protected:
            shutil.rmtree(p, ignore_errors=True)
            excess -= 1


def _publish(staged: Path, final: Path) -> None:
    """Flush ``staged`` to disk and rename it to ``final`` (a same-named older folder is replaced)."""
    _fsync_tree(staged)
    aside = None
    if final.exists():
        aside = final.with_name(f"{_ASIDE_PREFIX}{final.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(staged, final)
    _fsync(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in [*files, "."]:
            _fsync(os.path.join(root, name))


def _fsync(path: Path | str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:  # nor can every filesystem fsync one
        pass
    finally:
        os.close(fd)


_OOM = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "OutOfMemoryError")
_DTYPE = re.compile(r"bfloat16|BFloat16|\bHalf\b|float16|\bdtype\b|scalar ?type", re.IGNORECASE)
_LOAD = re.compile(r"checkpoint|zip archive|PytorchStreamReader|deserializ|safetensor|state_dict|header|size mis", re.I)


def training_error(
    exc: BaseException, *, out: Path, step: int | None = None, resuming: str | None = None
) -> BaseException:
    """The exception to show the user for ``exc`` raised by the training stack (itself when already readable).

    ``step`` is the step that failed and ``resuming`` the checkpoint being loaded when it failed
    (both optional; :class:`SafeTrainerMixin` passes them). Example::

        training_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), out=Path("saves/run"))
        # TrainingError("Training ran out of GPU memory (RuntimeError: CUDA out of memory. ...). The last
        # usable checkpoint is saves/run/checkpoint-8. Fix: lower per_device_train_batch_size ...")
    """
    if isinstance(exc, FinetuneKitError):
        return exc
    what = " ".join(f"{type(exc).__name__}: {exc}".split())  # one paragraph
    short = what if len(what) <= 300 else what[:297] + "..."
    at = f" at step {step}" if step else ""
    checkpoint = last_checkpoint(out)
    kept = f" The last usable checkpoint is {checkpoint}." if checkpoint else ""
    name = type(exc).__name__
    if name in ("OutOfMemoryError", "MemoryError") or any(m in str(exc) for m in _OOM):
        memory = "GPU memory" if "CUDA" in str(exc) or name == "OutOfMemoryError" else "memory"
        return TrainingError(
            f"Training ran out of {memory}{at} ({short}).{kept} Fix: lower per_device_train_batch_size (raise "
            "gradient_accumulation_steps to keep the effective batch size), lower cutoff_len, set "
            "gradient_checkpointing: true, or load the model in 4 bits with quantization_bit: 4."
        )
    invalid = re.search(r"valid checkpoint (?:at|in) (\S+)", str(exc))  # transformers' own resume check
    folder = resuming if resuming and _looks_like_load_error(exc) else invalid.group(1) if invalid else None
    if folder:
        return TrainingError(
            f"Could not resume from {folder}: the checkpoint is corrupt, incomplete or made with other settings "
            f"({short}). Fix: delete {folder} to resume from the checkpoint before it, or choose another one with "
            "resume_from_checkpoint: <path>, or set overwrite_output_dir: true to start over."
        )
    if isinstance(exc, (RuntimeError, TypeError, ValueError, NotImplementedError)) and _DTYPE.search(str(exc)):
        return TrainingError(
            f"Training hit a dtype problem{at} ({short}): the model, its inputs or a kernel disagree on the "
            f"floating-point type, usually bf16/fp16 on hardware or operations that lack it.{kept} Fix: train in "
            "fp32 (bf16: false, fp16: false), use bf16: true rather than fp16 on GPUs that support it, or load the "
            "model with infer_dtype: float32."
        )
    return TrainingError(f"Training failed{at} with {what}.{kept} Set FINETUNE_KIT_TRACEBACK=1 for the traceback.")


def _looks_like_load_error(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, EOFError, KeyError, pickle.UnpicklingError, json.JSONDecodeError)):
        return True
    return "Safetensor" in type(exc).__name__ or bool(_LOAD.search(str(exc)))
