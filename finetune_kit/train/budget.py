"""A trainer's GPU memory plan: :mod:`finetune_kit.train.vram` fed from a :class:`LoraTrainer`'s settings.

``LoraTrainer.plan()`` and ``finetune-kit train --plan`` print it; ``gradient_checkpointing:
auto`` (the default) asks it whether training fits the GPU without recomputing activations, and if
not, how few decoder layers need to recompute theirs.
Only the model's ``config.json`` is read, never its weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from finetune_kit.models.loaded import LoadedModel
from finetune_kit.train.distributed import deepspeed_config, offloads, sharded, world_size, zero_stage
from finetune_kit.train.vram import (
    MemoryInputs,
    MemoryPlan,
    ModelShape,
    checkpointed_layers_needed,
    plan_memory,
    suggest,
)

if TYPE_CHECKING:
    from finetune_kit.data.tokenize import TokenizedDataset
    from finetune_kit.train.trainer import LoraTrainer

_GIB = 2**30


@dataclass(frozen=True)
class TrainingPlan:
    """The estimated peak GPU memory per GPU of a training run, and what to change when it does not fit.

    ``gpu_bytes`` is the smallest visible GPU's memory (None without CUDA: nothing to fit).
    ``changes`` lists, cheapest first, YAML changes that make it fit, each with its own plan.
    """

    memory: MemoryPlan
    inputs: MemoryInputs
    gpu_bytes: int | None
    gpus: int
    changes: tuple[tuple[str, MemoryPlan], ...] = ()

    @property
    def fits(self) -> bool | None:
        """True/False against the smallest visible GPU; None when there is no GPU to fit."""
        return None if self.gpu_bytes is None else self.memory.fits(self.gpu_bytes)

    def __str__(self) -> str:
        return self.render()

    def render(self) -> str:
        lines = [self.memory.render()]
        if self.gpu_bytes is None:
            lines.append("fits:             no CUDA GPU visible; the plan is for a GPU of your choice")
        elif self.fits:
            lines.append(f"fits:             yes, on {self.gpus} GPU(s) of {self.gpu_bytes / _GIB:.1f} GiB")
        else:
            lines.append(f"fits:             NO: needs {self.memory.gib:.1f} GiB of {self.gpu_bytes / _GIB:.1f} GiB")
            for change, plan in self.changes:
                lines.append(f"  try:            {change}  -> {plan.gib:.1f} GiB per GPU")
            if not self.changes:
                lines.append("  try:            more GPUs with deepspeed: ds_z3_offload, or a smaller model")
        return "\n".join(lines)


def memory_inputs(
    trainer: LoraTrainer,
    tokens: TokenizedDataset | None = None,
    *,
    checkpointing: bool,
    layers: int | None = None,
    gpus: int | None = None,
) -> MemoryInputs:
    """:class:`MemoryInputs` for ``trainer`` on ``gpus`` GPUs (default: the launched processes, 1 alone).

    The padded length is the longest encoded row when ``tokens`` are given (at most
    ``cutoff_len``), else ``cutoff_len`` (the worst case)."""
    t, m, lora = trainer.training, trainer.method, trainer.lora
    quant = trainer.source.config.quantization_bit if trainer._quantized() else None
    method = "qlora" if quant else m.finetuning_type
    seq_len = trainer.encoding.cutoff_len
    if tokens is not None and not tokens.streaming and len(tokens):
        column = tokens.dataset[("chosen_" if tokens.stage in ("rm", "dpo") else "") + "input_ids"]
        seq_len = min(seq_len, max(len(x) for x in column))
    rows = 2 if m.stage in ("dpo",) else 1  # a preference pair runs chosen and rejected together
    config = deepspeed_config(t.deepspeed) if t.deepspeed else None
    offload_optimizer, offload_param = offloads(config)
    dtype = "bfloat16" if t.bf16 else "float16" if t.fp16 else "float32"
    stage = zero_stage(config) if config else (3 if t.fsdp else 0)
    return MemoryInputs(
        method=method,
        lora_rank=lora.lora_rank,
        lora_target=tuple(lora.lora_target),
        freeze_trainable_layers=m.freeze_trainable_layers,
        quantization_bit=cast("Literal[4, 8] | None", quant),
        double_quantization=trainer.source.config.double_quantization,
        dtype=cast("Literal['bfloat16', 'float16', 'float32']", dtype),
        micro_batch=t.per_device_train_batch_size * rows,
        seq_len=seq_len,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        gradient_checkpointing=checkpointing,
        checkpoint_layers=layers if checkpointing else None,
        zero_stage=cast("Literal[0, 1, 2, 3]", stage),
        offload_optimizer=offload_optimizer,
        offload_param=offload_param,
        n_gpus=gpus or world_size(),
        optimizer="adamw_8bit" if "8bit" in t.optim else "adamw",
        chunked_loss=(t.chunked_loss or t.enable_liger_kernel) and m.stage in ("sft", "pt") and not sharded(t),
    )


def plan_trainer(
    trainer: LoraTrainer, tokens: TokenizedDataset | None = None, *, gpus: int | None = None
) -> TrainingPlan:
    """The memory plan of ``trainer`` as configured (``gradient_checkpointing: auto`` resolved) on
    ``gpus`` processes (default: the launched ones, 1 alone; ``finetune-kit train --plan`` passes
    the number it would launch)."""
    shape = _shape(trainer)
    checkpointing, layers = resolve_checkpoint_layers(trainer, tokens, shape=shape, gpus=gpus)
    inputs = memory_inputs(trainer, tokens, checkpointing=checkpointing, layers=layers, gpus=gpus)
    visible = visible_gpu_bytes()
    gpu_bytes = min(visible) if visible else None
    memory = plan_memory(shape, inputs)
    changes: tuple[tuple[str, MemoryPlan], ...] = ()
    if gpu_bytes is not None and not memory.fits(gpu_bytes):
        changes = tuple(suggest(shape, inputs, gpu_bytes))
    return TrainingPlan(memory=memory, inputs=inputs, gpu_bytes=gpu_bytes, gpus=inputs.n_gpus, changes=changes)


def resolve_checkpoint_layers(
    trainer: LoraTrainer, tokens: TokenizedDataset | None = None, *, shape: Any = None, gpus: int | None = None
) -> tuple[bool, int | None]:
    """Whether activations are recomputed, and in how many decoder layers (the first n; None: all).

    ``gradient_checkpointing_layers`` when given; with ``auto`` otherwise the fewest layers with
    which the memory plan fits the smallest visible GPU (recomputing fewer layers is faster)."""
    t = trainer.training
    chosen = t.gradient_checkpointing_layers
    if isinstance(t.gradient_checkpointing, bool):
        return t.gradient_checkpointing, chosen if t.gradient_checkpointing else None
    visible = visible_gpu_bytes()
    if not visible:
        return False, None
    shape = shape or _shape(trainer)
    inputs = memory_inputs(trainer, tokens, checkpointing=False, gpus=gpus)
    needed = checkpointed_layers_needed(shape, inputs, min(visible))
    if not needed:
        return False, None
    return True, chosen or (needed if needed < shape.num_hidden_layers else None)


def describe_checkpointing(trainer: LoraTrainer, tokens: TokenizedDataset | None = None) -> str:
    """Gradient checkpointing as it will run, and why when ``auto`` chose it (for ``explain()``)."""
    on, layers = resolve_checkpoint_layers(trainer, tokens)
    state = ("on" + (f" in the first {layers} decoder layers" if layers else "")) if on else "off"
    if trainer.training.gradient_checkpointing != "auto":
        return state
    if not visible_gpu_bytes():
        return f"{state} (auto: no CUDA GPU)"
    return f"{state} (auto: the memory plan {'needs it' if on else 'fits without it'})"


def visible_gpu_bytes() -> list[int]:
    """Total memory (bytes) of each visible CUDA GPU; empty without CUDA."""
    import torch

    return [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]


def _shape(trainer: LoraTrainer) -> Any:

    if isinstance(trainer.model, LoadedModel):
        return ModelShape.from_config(trainer.model.model.config)
    from transformers import AutoConfig

    source = trainer.source
    cfg = AutoConfig.from_pretrained(source.resolve(), trust_remote_code=source.config.trust_remote_code)
    return ModelShape.from_config(cfg)
