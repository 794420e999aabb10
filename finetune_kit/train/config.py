"""LoRA and training settings (LLaMA-Factory's finetuning and training arguments)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from finetune_kit.config.base import StageConfig, option


@dataclass(frozen=True, repr=False)
class LoraConfig(StageConfig):
    """Which layers get LoRA adapters and how large they are."""

    section = "lora"

    finetuning_type: Literal["lora"] = option("lora", "Only lora for now (freeze/full/oft are planned).")
    lora_rank: int = option(8, "LoRA rank r.")
    lora_alpha: int | None = option(None, "LoRA alpha; default 2 x lora_rank (LLaMA-Factory's default).")
    lora_dropout: float = option(0.0, "Dropout on the LoRA path.")
    lora_target: tuple[str, ...] = option(
        ("all",),
        "'all' = every linear layer but the output head, or module names (q_proj,v_proj,...), comma separated.",
    )
    additional_target: tuple[str, ...] | None = option(None, "Modules trained in full and saved with the adapter.")
    use_rslora: bool = option(False, "Rank-stabilized LoRA scaling (alpha / sqrt(r)).")

    def _check(self) -> list[str]:
        problems = []
        if self.lora_rank < 1:
            problems.append(f"lora_rank: got {self.lora_rank}; expected a positive integer such as 8")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            problems.append(f"lora_alpha: got {self.lora_alpha}; expected a positive number such as 16")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout: got {self.lora_dropout}; expected a value in [0, 1)")
        if not self.lora_target:
            problems.append("lora_target is empty; use 'all' or module names like q_proj,v_proj")
        return problems

    @property
    def alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank


@dataclass(frozen=True, repr=False)
class TrainingConfig(StageConfig):
    """Optimisation, logging and output settings (names and defaults of transformers/LLaMA-Factory)."""

    section = "training"

    output_dir: str = option("saves/lora", "Where the adapter, logs, plots and checkpoints are written.")
    overwrite_output_dir: bool = option(False, "Allow writing into a non-empty output_dir (no auto-resume).")
    resume_from_checkpoint: str | None = option(None, "A checkpoint-* folder to resume from, or 'latest'.")
    learning_rate: float = option(5e-5, "Peak learning rate of AdamW.")
    num_train_epochs: float = option(3.0, "Epochs over the training data (ignored when max_steps > 0).")
    max_steps: int = option(-1, "Stop after this many optimizer steps (-1: use num_train_epochs).")
    per_device_train_batch_size: int = option(8, "Examples per device per micro-batch.")
    per_device_eval_batch_size: int = option(8, "Examples per device per evaluation batch.")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.")
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
    ] = option("linear", "Learning-rate schedule.")
    warmup_steps: int = option(0, "Linear warm-up steps.")
    warmup_ratio: float = option(0.0, "Warm-up as a share of all steps (used when warmup_steps is 0).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm.")
    optim: str = option("adamw_torch", "Optimizer name understood by transformers (adamw_torch, ...).")
    logging_steps: int = option(10, "Log loss and learning rate every N steps.")
    save_steps: int = option(500, "Save a resumable checkpoint every N steps.")
    save_total_limit: int | None = option(None, "Keep at most N checkpoints.")
    eval_steps: int | None = option(None, "Evaluate every N steps when an eval set is given (default: per epoch).")
    bf16: bool = option(False, "Train in bfloat16 mixed precision (needs a GPU with bf16).")
    fp16: bool = option(False, "Train in float16 mixed precision (needs a GPU).")
    gradient_checkpointing: bool = option(False, "Recompute activations to save memory.")
    group_by_length: bool = option(False, "Batch examples of similar length together: less padding, faster steps.")
    seed: int = option(42, "Random seed for data order and initialisation.")
    plot_loss: bool = option(False, "Write training_loss.png (and training_eval_loss.png) to output_dir.")
    report_to: tuple[str, ...] = option(("none",), "Experiment trackers: none, tensorboard, wandb, ...")
    dataloader_num_workers: int = option(0, "Worker processes for data loading.")
    disable_tqdm: bool = option(False, "Hide the progress bar.")

    def _check(self) -> list[str]:
        problems = []
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "save_steps",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name}: got {getattr(self, name)}; expected a positive integer")
        if self.learning_rate <= 0:
            problems.append(f"learning_rate: got {self.learning_rate}; expected a positive number such as 1e-4")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            problems.append("num_train_epochs must be positive when max_steps is not set")
        if self.bf16 and self.fp16:
            problems.append("bf16 and fp16 are both true; pick one")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio: got {self.warmup_ratio}; expected a value in [0, 1)")
        return problems
