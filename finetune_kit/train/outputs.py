"""Where a run starts: a fresh output_dir, an explicit checkpoint, or the latest complete checkpoint."""

from __future__ import annotations

import warnings
from pathlib import Path

from finetune_kit.errors import ConfigError, FinetuneKitWarning, OutputExistsError
from finetune_kit.train.config import TrainingConfig
from finetune_kit.train.safety import last_checkpoint


def resume_point(t: TrainingConfig, out: Path) -> str | None:
    """The checkpoint to resume from (None: start fresh); refuses to write over a finished run."""
    if t.resume_from_checkpoint:
        if t.resume_from_checkpoint == "latest":
            last = last_checkpoint(out)
            if last is None:
                raise ConfigError(
                    f"resume_from_checkpoint: latest, but {out} has no complete checkpoint-* folder to resume from"
                )
            return last
        if not Path(t.resume_from_checkpoint).is_dir():
            raise ConfigError(
                f"resume_from_checkpoint={t.resume_from_checkpoint!r} is not a folder. Fix: point "
                "it at a checkpoint-* folder inside a previous output_dir"
            )
        return t.resume_from_checkpoint
    if not out.exists() or not any(out.iterdir()) or t.overwrite_output_dir:
        return None
    last = last_checkpoint(out)
    if last is None and _only_leftovers(out):
        warnings.warn(
            f"{out} holds only what a run stopped before its first checkpoint left behind; training starts over.",
            FinetuneKitWarning,
            stacklevel=4,
        )
        return None
    if last:
        warnings.warn(
            f"Resuming training from {last} (output_dir already has checkpoints). Change output_dir or "
            "set overwrite_output_dir: true to start over.",
            FinetuneKitWarning,
            stacklevel=4,
        )
        return last
    raise OutputExistsError(
        f"output_dir {out} already exists and is not empty. Fix: choose a new output_dir, or "
        "set overwrite_output_dir: true to write over it"
    )


# what a run writes before its first complete checkpoint: the log, tracker events, PiSSA's initial
# adapter and checkpoint folders still being written
_EARLY = {"trainer_log.jsonl", "runs", "pissa_init"}


def _only_leftovers(out: Path) -> bool:
    return all(p.name in _EARLY or p.name.startswith(".tmp-checkpoint-") for p in out.iterdir())
