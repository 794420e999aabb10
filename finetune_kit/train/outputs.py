"""Where a run starts: a fresh output_dir, an explicit checkpoint, or the latest complete checkpoint."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from finetune_kit.errors import ConfigError, FinetuneKitWarning, OutputExistsError
from finetune_kit.train.config import TrainingConfig
from finetune_kit.train.distributed import LAUNCH_RECORD
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


def check_resume(checkpoint: str, t: TrainingConfig, processes: int) -> None:
    """Before resuming ``checkpoint`` with ``processes`` processes: refuse what cannot load, warn what changes.

    A plain (DDP or one-process) checkpoint resumes on any number of processes. A DeepSpeed ZeRO
    checkpoint keeps one optimizer shard per process, so it resumes with DeepSpeed on the same
    number only; the error says how to go on from its weights instead.
    """
    folder = Path(checkpoint)
    shards = sorted(folder.glob("global_step*/*zero_pp_rank_*optim_states.pt"))
    ranks = {s.name.split("zero_pp_rank_")[1].split("_")[0] for s in shards}
    if ranks and (not t.deepspeed or len(ranks) != processes):
        now = f"{processes} process{'es' if processes != 1 else ''}" + (" with DeepSpeed" if t.deepspeed else "")
        raise ConfigError(
            f"resuming {folder}: it is a DeepSpeed ZeRO checkpoint of {len(ranks)} processes (one optimizer shard "
            f"each), and this run has {now}; DeepSpeed cannot re-shard it. Fix: resume with deepspeed set and "
            f"{len(ranks)} GPUs (CUDA_VISIBLE_DEVICES, or NPROC_PER_NODE={len(ranks)}), or start a new run from "
            f"its weights (adapter_name_or_path: {folder} for LoRA; model_name_or_path: {folder} for full/freeze) "
            "with a fresh optimizer and a new output_dir"
        )
    try:
        saved = json.loads((folder / LAUNCH_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    global_now = processes * t.per_device_train_batch_size * t.gradient_accumulation_steps
    global_then = int(saved.get("global_batch_size", global_now))
    if global_then != global_now:
        per_step = t.per_device_train_batch_size * processes
        fix = f" (here gradient_accumulation_steps: {global_then // per_step})" if global_then % per_step == 0 else ""
        warnings.warn(
            f"{folder} was trained with a global batch of {global_then} examples per step "
            f"({saved.get('world_size')} x {saved.get('per_device_train_batch_size')} x "
            f"{saved.get('gradient_accumulation_steps')}); this run has {global_now} ({processes} x "
            f"{t.per_device_train_batch_size} x {t.gradient_accumulation_steps}), so steps see a different number "
            "of examples and the data position continues by step count. Fix: keep processes x "
            f"per_device_train_batch_size x gradient_accumulation_steps the same{fix}",
            FinetuneKitWarning,
            stacklevel=3,
        )
