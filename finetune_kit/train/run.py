"""The training loop: a ``transformers.Trainer`` (or TRL trainer) over resolved values, then every artifact.

``fit`` knows nothing about ``LoraTrainer``: it takes a ready model, the stage's
:class:`~finetune_kit.train.stages.Objective`, training arguments, tokenized data (which supplies
its own collator for sft/pt, so packing can plug in) and the provenance record to save. The
trainer class gets :class:`~finetune_kit.train.safety.SafeTrainerMixin` in front (atomic
checkpoints, non-finite guard) and the display callbacks of :mod:`finetune_kit.train.progress`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_kit._artifacts import RUN_RECORD, TRAIN_RESULTS, write_record
from finetune_kit._fs import write_json
from finetune_kit.errors import FinetuneKitError
from finetune_kit.models.adapters import quiet_checkpointing
from finetune_kit.models.varlen import padding_free, varlen_training
from finetune_kit.train.distributed import deepspeed_config, fsdp_config, sharded, world_size
from finetune_kit.train.loss import chunked_loss
from finetune_kit.train.plot import plot_loss
from finetune_kit.train.progress import check_trackers, console_callbacks
from finetune_kit.train.safety import SafeTrainerMixin, guard_signals, training_error
from finetune_kit.train.speed import compiled_layers, compiles, fused_lora, no_cudnn_attention, no_input_casts

if TYPE_CHECKING:
    from collections.abc import Callable

    from finetune_kit.data.tokenize import TokenizedDataset
    from finetune_kit.train.config import TrainingConfig
    from finetune_kit.train.stages import Objective


@dataclass(frozen=True)
class Fitted:
    """What a finished loop produced."""

    metrics: dict[str, float]
    log_history: tuple[dict[str, Any], ...]
    plots: tuple[Path, ...]


def training_arguments(t: TrainingConfig, *, has_eval: bool, cls: type | None = None, **extra: Any) -> Any:
    """``transformers.TrainingArguments`` (or the stage's subclass ``cls``, e.g. TRL's ``DPOConfig``, with
    ``extra`` fields) for ``t``; built before the model loads, as Accelerate's state lives here."""
    import torch
    from transformers import TrainingArguments

    cls = cls or TrainingArguments
    warmup: float = t.warmup_steps if t.warmup_steps else t.warmup_ratio  # transformers reads <1 as a ratio
    eval_kwargs: dict[str, Any] = {}
    if has_eval:
        eval_kwargs = {"eval_strategy": "steps" if t.eval_steps else "epoch", "eval_steps": t.eval_steps}
    kwargs: dict[str, Any] = dict(
        output_dir=t.output_dir,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=warmup,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        logging_steps=t.logging_steps,
        save_strategy=t.save_strategy,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        bf16=t.bf16,
        fp16=t.fp16,
        seed=t.seed,
        data_seed=t.seed,
        report_to=list(t.report_to),
        dataloader_num_workers=t.dataloader_num_workers,
        disable_tqdm=t.disable_tqdm,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        include_num_input_tokens_seen=True,
        ddp_timeout=t.ddp_timeout,
        ddp_find_unused_parameters=False,  # every trained weight gets a gradient each step
        use_liger_kernel=t.enable_liger_kernel,  # transformers patches the model (PEFT-wrapped too) with Liger's
        **_sharding_kwargs(t),
        **_version_kwargs(t),
        **eval_kwargs,
    )
    return cls(**{**kwargs, **extra})  # the stage's arguments win


def _sharding_kwargs(t: TrainingConfig) -> dict[str, Any]:
    """DeepSpeed (a resolved config file) or FSDP arguments, when asked for."""
    kwargs: dict[str, Any] = {}
    if t.deepspeed:
        kwargs["deepspeed"] = deepspeed_config(t.deepspeed)
    if t.fsdp:
        kwargs["fsdp"] = t.fsdp
        kwargs["fsdp_config"] = fsdp_config(t.fsdp_config)
    return kwargs


def _version_kwargs(t: TrainingConfig) -> dict[str, Any]:
    """Arguments whose names differ across transformers 5.x releases, under the name this version has."""
    from transformers import TrainingArguments

    names = inspect.signature(TrainingArguments.__init__).parameters
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    kwargs: dict[str, Any] = {f"{prefix}_checkpointing": t.gradient_checkpointing is True}
    if t.gradient_checkpointing is True:  # the non-reentrant kind works under DDP, ZeRO-3 and FSDP
        kwargs[f"{prefix}_checkpointing_kwargs"] = {"use_reentrant": False}
    if t.group_by_length:
        if "train_sampling_strategy" in names:
            kwargs["train_sampling_strategy"] = "group_by_length"
        else:
            kwargs["group_by_length"] = True
    return kwargs


def fit(
    model: Any,
    objective: Objective,
    args: Any,
    train_set: TokenizedDataset,
    eval_set: TokenizedDataset | None,
    *,
    t: TrainingConfig,
    tokenizer: Any,
    out: Path,
    resume: str | None,
    record: dict[str, Any],
    save: Callable[[Any, Path], None] | None = None,
) -> Fitted:
    """Train ``model`` for ``objective``; on the main process write the model (``save(model, out)`` when
    given, else the trainer's own save), tokenizer, state, metrics, ``record`` (the provenance) and,
    if ``t.plot_loss``, the loss plots to ``out``."""
    check_trackers(t.report_to)
    out.mkdir(parents=True, exist_ok=True)
    base = objective.trainer
    cls = type("Safe" + base.__name__, (SafeTrainerMixin, base), {})
    add, remove = console_callbacks(out, disable_tqdm=t.disable_tqdm)
    if t.gradient_checkpointing is True and t.gradient_checkpointing_layers:
        from finetune_kit.train.callbacks import CheckpointFirstLayers

        add.append(CheckpointFirstLayers(t.gradient_checkpointing_layers))
    kwargs: dict[str, Any] = dict(
        model=model,
        args=args,
        train_dataset=train_set.dataset,
        eval_dataset=eval_set.dataset if eval_set is not None else None,
        processing_class=tokenizer,
        callbacks=add,
    )
    varlen = objective.collates and padding_free(model, t.padding_free)
    if objective.collates:
        kwargs["data_collator"] = train_set.collator(tokenizer, varlen=varlen)
    try:
        with quiet_checkpointing():
            hf = cls(**kwargs)
    except FinetuneKitError:
        raise
    except Exception as exc:
        raise training_error(exc, out=out) from exc
    for callback in remove:
        hf.remove_callback(callback)
    hf.nonfinite_loss = t.nonfinite_loss
    hf.finetune_kit_output = out
    shards = sharded(t)
    # the chunked loss needs the whole head weight in each process: not with ZeRO-3/FSDP sharding
    chunked = t.chunked_loss and objective.collates and not t.enable_liger_kernel and not shards
    compiling = compiles(model, t.torch_compile, collates=objective.collates, sharded=shards, processes=world_size())
    with (
        guard_signals(hf),
        quiet_checkpointing(),
        chunked_loss(model, enabled=chunked),
        varlen_training(model, enabled=varlen),
        no_input_casts(model, mixed_precision=t.bf16 or t.fp16),
        fused_lora(model, enabled=not shards),  # it reads lora_B's weight outside lora_B's forward
        no_cudnn_attention(),
        compiled_layers(model, enabled=compiling, fall_back=t.torch_compile == "auto"),
    ):
        # a signal stop raises TrainingInterrupted on leaving
        try:
            output = hf.train(resume_from_checkpoint=resume)
        except FinetuneKitError:
            raise
        except Exception as exc:
            raise training_error(exc, out=out) from exc
    metrics = {**output.metrics, **_peak_memory(hf)}
    if eval_set is not None:
        with quiet_checkpointing():
            metrics.update(hf.evaluate())
    plots: tuple[Path, ...] = ()
    if save is None:
        hf.save_model(str(out))  # every process: ZeRO-3/FSDP gather the weights; the main one writes
    if hf.is_world_process_zero():
        if save is not None:
            save(hf.model, out)
        tokenizer.save_pretrained(out)
        hf.save_state()
        write_json(out / TRAIN_RESULTS, metrics)
        write_record(out, RUN_RECORD, record)
        if t.plot_loss:
            keys = (
                ("loss", "eval_loss", "rewards/accuracies")
                if "rewards/accuracies" in str(hf.state.log_history)
                else ("loss", "eval_loss")
            )
            plots = tuple(plot_loss(hf.state.log_history, out, keys))
    return Fitted(metrics=metrics, log_history=tuple(hf.state.log_history), plots=plots)


def _peak_memory(hf: Any) -> dict[str, float]:
    """``peak_gpu_memory_gib``: the most GPU memory any process held (allocated tensors, load and training)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=hf.args.device)
    if hf.accelerator.num_processes > 1:
        peak = hf.accelerator.gather(peak)
    return {"peak_gpu_memory_gib": round(float(peak.max()), 2)}
