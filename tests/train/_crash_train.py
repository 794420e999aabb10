"""A small LoRA training run that test_crash_safety.py kills, signals or lets finish.

    python _crash_train.py MODEL_DIR DATA_DIR OUT '{"save_steps": 2}'

The last argument holds TrainingConfig changes as JSON. Seams, from the environment:

- ``CRASH_PAUSE_AT=N``: before step N+1 begins, create ``OUT.paused`` and wait until the test
  deletes it (the test kills or signals the process meanwhile);
- ``CRASH_KILL_IN_SAVE=N``: SIGKILL this process while ``checkpoint-N`` is being written
  (after its weights and optimizer are on disk, before its RNG and trainer state);
- ``CRASH_SIGNAL_AT=N``: send SIGTERM to this process at the end of step N.

The tests call :func:`install_seams` in-process too, with ``monkeypatch.setattr``.

Exit code: 0 when training finished, ``TrainingInterrupted.exit_code`` when a signal stopped it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

ROWS = [
    {"instruction": "你们包邮吗？", "input": "", "output": "满九十九元包邮。"},
    {"instruction": "Do you ship abroad?", "input": "", "output": "No, we only ship within China."},
    {"instruction": "多久发货？", "input": "", "output": "四十八小时内发货。"},
    {"instruction": "Can I pay by card?", "input": "", "output": "Yes, all major cards work."},
    {"instruction": "What is your return policy?", "input": "", "output": "Returns within seven days."},
    {"instruction": "可以开发票吗？", "input": "", "output": "可以，下单时备注抬头。"},
]

SETTINGS = dict(
    learning_rate=5e-3,
    max_steps=5,
    per_device_train_batch_size=2,
    logging_steps=1,
    save_steps=2,
    disable_tqdm=True,
    report_to="none",
    seed=0,
)


def write_data(folder: Path) -> Path:
    """Write the dataset folder (6 rows: 3 steps an epoch at 2 examples a step) once; return it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.json").write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
    return folder


def make_trainer(model_dir: Path, out: Path, **training):
    """The trainer every run of the crash tests uses (LoRA dropout on, so the RNG state matters)."""
    from finetune_kit import LoraTrainer
    from finetune_kit.models.source import ModelSource

    settings = {**SETTINGS, "output_dir": str(out), **training}
    return (
        LoraTrainer(ModelSource.local(model_dir))
        .with_lora(lora_rank=4, lora_dropout=0.1)
        .with_data(cutoff_len=64)
        .with_training(**settings)
    )


def train(model_dir: Path, data_dir: Path, out: Path, **training):
    from finetune_kit import DatasetRegistry

    return make_trainer(model_dir, out, **training).train(DatasetRegistry.from_dir(data_dir).load("tiny"))


def install_seams(out: Path, *, pause_at: int = 0, kill_in_save: int = 0, signal_at: int = 0, patch=setattr) -> None:
    """Patch ``transformers.Trainer`` with the seams the tests need (``patch``: ``monkeypatch.setattr`` in-process).

    ``pause_at``: before step N+1, create ``OUT.paused`` and wait until it is deleted; ``kill_in_save``:
    SIGKILL while checkpoint-N is written; ``signal_at``: send SIGTERM to this process after step N.
    """
    import transformers
    from transformers import TrainerCallback

    marker = out.with_name(out.name + ".paused")

    class Seams(TrainerCallback):
        paused = False

        def on_step_begin(self, args, state, control, **kwargs):
            if pause_at and state.global_step == pause_at and not self.paused:
                self.paused = True
                marker.touch()
                deadline = time.time() + 60
                while marker.exists() and time.time() < deadline:
                    time.sleep(0.02)

        def on_step_end(self, args, state, control, **kwargs):
            if signal_at and state.global_step == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)

    init = transformers.Trainer.__init__

    def with_seams(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(Seams())

    patch(transformers.Trainer, "__init__", with_seams)
    if kill_in_save:
        save_rng = transformers.Trainer._save_rng_state

        def dying(self, output_dir):
            if self.state.global_step == kill_in_save:
                os.kill(os.getpid(), signal.SIGKILL)
            return save_rng(self, output_dir)

        patch(transformers.Trainer, "_save_rng_state", dying)


def main() -> int:
    from finetune_kit.errors import TrainingInterrupted

    model_dir, data_dir, out = (Path(a) for a in sys.argv[1:4])
    training = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    env = {k: int(os.environ.get(f"CRASH_{k.upper()}", "0")) for k in ("pause_at", "kill_in_save", "signal_at")}
    install_seams(out, **env)
    try:
        train(model_dir, data_dir, out, **training)
    except TrainingInterrupted as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
