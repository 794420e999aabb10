"""Method, LoRA, preference and training settings (LLaMA-Factory's finetuning and training arguments)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from finetune_kit.config.base import StageConfig, option

Stage = Literal["sft", "pt", "dpo", "kto"]
FinetuningType = Literal["lora", "freeze", "full"]


@dataclass(frozen=True, repr=False)
class MethodConfig(StageConfig):
    """What is trained and on which objective: the stage and the fine-tuning type (LoRA, freeze or full)."""

    section = "method"

    stage: Stage = option(
        "sft",
        "Training stage: sft (instructions), pt (plain text), dpo (preference pairs: sigmoid/orpo/simpo/...) or "
        "kto (liked/disliked replies).",
    )
    finetuning_type: FinetuningType = option(
        "lora", "lora (adapters), freeze (train the last/first layers only) or full (every weight)."
    )
    freeze_trainable_layers: int = option(
        2, "freeze: how many hidden layers train; positive = the last n layers, negative = the first n."
    )
    freeze_trainable_modules: tuple[str, ...] = option(
        ("all",), "freeze: module names inside those layers that train (mlp,self_attn,...), or 'all'."
    )
    freeze_extra_modules: tuple[str, ...] | None = option(
        None, "freeze: modules outside the hidden layers that train too (embed_tokens, lm_head, norm, ...)."
    )

    def _check(self) -> list[str]:
        problems = []
        if self.freeze_trainable_layers == 0:
            problems.append("freeze_trainable_layers: got 0; expected a positive (last n) or negative (first n) count")
        if not self.freeze_trainable_modules:
            problems.append("freeze_trainable_modules is empty; use 'all' or module names like mlp,self_attn")
        return problems


@dataclass(frozen=True, repr=False)
class PreferenceConfig(StageConfig):
    """The preference objective of the dpo and kto stages (LLaMA-Factory's keys, computed by TRL)."""

    section = "preference"

    pref_beta: float = option(0.1, "beta: how far the policy may move from the reference (dpo, orpo, simpo, kto).")
    pref_loss: Literal["sigmoid", "hinge", "ipo", "orpo", "simpo"] = option(
        "sigmoid",
        "dpo loss: sigmoid (DPO), hinge, ipo, orpo (no reference model) or simpo (no reference model).",
    )
    pref_ftx: float = option(0.0, "Weight of the supervised (chosen-reply) loss added to the preference loss.")
    simpo_gamma: float = option(0.5, "SimPO's target reward margin.")
    dpo_label_smoothing: float = option(0.0, "Robust DPO: assumed share of flipped preference labels, in [0, 0.5).")
    kto_chosen_weight: float = option(1.0, "kto: weight of the desirable (liked) replies' loss.")
    kto_rejected_weight: float = option(1.0, "kto: weight of the undesirable (disliked) replies' loss.")

    def _check(self) -> list[str]:
        problems = []
        if self.pref_beta <= 0:
            problems.append(f"pref_beta: got {self.pref_beta}; expected a positive number such as 0.1")
        if self.pref_ftx < 0:
            problems.append(f"pref_ftx: got {self.pref_ftx}; expected 0 or a positive weight")
        if not 0 <= self.dpo_label_smoothing < 0.5:
            problems.append(f"dpo_label_smoothing: got {self.dpo_label_smoothing}; expected a value in [0, 0.5)")
        if self.dpo_label_smoothing and self.pref_loss != "sigmoid":
            problems.append("dpo_label_smoothing works with pref_loss: sigmoid only")
        for name in ("kto_chosen_weight", "kto_rejected_weight"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}: got {getattr(self, name)}; expected a positive weight such as 1.0")
        return problems


@dataclass(frozen=True, repr=False)
class LoraConfig(StageConfig):
    """Which layers get LoRA adapters and how large they are."""

    section = "lora"

    lora_rank: int = option(8, "LoRA rank r.")
    lora_alpha: int | None = option(None, "LoRA alpha; default 2 x lora_rank (LLaMA-Factory's default).")
    lora_dropout: float = option(0.0, "Dropout on the LoRA path.")
    lora_target: tuple[str, ...] = option(
        ("all",),
        "'all' = every linear layer but the output head, or module names (q_proj,v_proj,...), comma separated.",
    )
    additional_target: tuple[str, ...] | None = option(None, "Modules trained in full and saved with the adapter.")
    use_rslora: bool = option(False, "Rank-stabilized LoRA scaling (alpha / sqrt(r)).")
    use_dora: bool = option(False, "Weight-decomposed LoRA (DoRA): a learned magnitude per output channel.")
    pissa_init: bool = option(
        False, "Initialise LoRA from the principal singular vectors of each weight (PiSSA) instead of zeros."
    )
    pissa_iter: int = option(16, "Fast-SVD iterations for PiSSA; -1 = exact SVD.")
    pissa_convert: bool = option(
        True,
        "Save a PiSSA adapter as a plain LoRA that applies to the original base (rank 2r). false keeps the raw "
        "PiSSA adapter, which only applies to the residual base (LLaMA-Factory's default).",
    )
    loraplus_lr_ratio: float | None = option(
        None, "LoRA+: learning rate of the B matrices = learning_rate x this ratio (16 is the paper's choice)."
    )
    loraplus_lr_embedding: float = option(1e-6, "LoRA+: learning rate of LoRA embedding layers.")
    create_new_adapter: bool = option(
        False, "With adapter_name_or_path: merge every given adapter and train a fresh one on top (not the last)."
    )

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
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio <= 0:
            problems.append(f"loraplus_lr_ratio: got {self.loraplus_lr_ratio}; expected a positive number such as 16")
        if self.pissa_init and self.use_dora:
            problems.append("pissa_init and use_dora cannot be combined (peft supports one initialisation); pick one")
        if self.pissa_init and not self.pissa_convert and self.pissa_iter != -1:
            problems.append(
                "pissa_convert: false with pissa_iter > 0 saves a raw PiSSA adapter that cannot be reloaded: the "
                "fast SVD is random, so a new load builds another residual base. Fix: keep pissa_convert: true "
                "(the default), or set pissa_iter: -1 (exact SVD)"
            )
        if self.pissa_iter < -1 or self.pissa_iter == 0:
            problems.append(
                f"pissa_iter: got {self.pissa_iter}; expected -1 (exact SVD) or a positive count such as 16"
            )
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
    save_strategy: Literal["steps", "epoch", "no"] = option(
        "steps",
        "When to save resumable checkpoints: every save_steps steps (and at the end), every epoch, or no (only the "
        "final model; a stop signal still saves one).",
    )
    save_steps: int = option(500, "Save a resumable checkpoint every N steps.")
    save_total_limit: int | None = option(None, "Keep at most N checkpoints.")
    eval_steps: int | None = option(None, "Evaluate every N steps when an eval set is given (default: per epoch).")
    bf16: bool = option(False, "Train in bfloat16 mixed precision (needs a GPU with bf16).")
    fp16: bool = option(False, "Train in float16 mixed precision (needs a GPU).")
    gradient_checkpointing: bool | Literal["auto"] = option(
        "auto",
        "Recompute activations to save memory: true, false, or auto (on only when the memory plan says training "
        "would not fit the GPU without it, and then only in as many decoder layers as it needs; off on CPU).",
    )
    gradient_checkpointing_layers: int | None = option(
        None,
        "With gradient checkpointing on: recompute only the first N decoder layers; the others keep their "
        "activations (faster, more memory). Default: all of them, or with auto the fewest the memory plan needs.",
    )
    group_by_length: bool = option(False, "Batch examples of similar length together: less padding, faster steps.")
    chunked_loss: bool = option(
        True,
        "sft/pt: compute the loss over the output head a chunk of trained tokens at a time, never holding the "
        "[tokens, vocabulary] logits (the same loss and gradients; far less memory with large vocabularies).",
    )
    padding_free: bool | Literal["auto"] = option(
        "auto",
        "sft/pt on a CUDA GPU: put each batch's examples back to back in one row, with no padding, and keep "
        "attention within each example with PyTorch's variable-length flash kernel (the same loss and gradients). "
        "auto: wherever it can run (CUDA, bf16/fp16 weights, flash_attn auto or sdpa); true: refuse to train "
        "where it cannot; false: padded batches.",
    )
    enable_liger_kernel: bool = option(
        False,
        "sft/pt: patch the model with Liger's Triton kernels (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU); "
        "needs a CUDA GPU and the liger-kernel package.",
    )
    torch_compile: bool | Literal["auto"] = option(
        "auto",
        "Compile each decoder layer with torch.compile while training: fewer, fused kernels, the first steps "
        "about half a minute slower. auto: on for sft/pt in a single process on a CUDA GPU (not quantized "
        "weights), a layer that fails to compile runs uncompiled; true: everywhere (a CPU needs a C++ "
        "compiler); false: never.",
    )
    seed: int = option(42, "Random seed for data order and initialisation.")
    plot_loss: bool = option(False, "Write training_loss.png (and training_eval_loss.png) to output_dir.")
    report_to: tuple[str, ...] = option(("none",), "Experiment trackers: none, tensorboard, wandb, ...")
    dataloader_num_workers: int = option(0, "Worker processes for data loading.")
    disable_tqdm: bool = option(False, "Hide the progress bar.")
    deepspeed: str | None = option(
        None,
        "DeepSpeed config: a JSON file, or a shipped one: ds_z0, ds_z2, ds_z2_offload, ds_z3, ds_z3_offload "
        "(ZeRO stage 0/2/3, offload = optimizer states and, for ZeRO-3, parameters in CPU memory).",
    )
    fsdp: str | None = option(
        None, "PyTorch FSDP, as transformers takes it: e.g. 'full_shard auto_wrap' (with fsdp_config for details)."
    )
    fsdp_config: str | dict[str, Any] | None = option(
        None, "FSDP options: a JSON file or a mapping (e.g. fsdp_version: 2, transformer_layer_cls_to_wrap)."
    )
    ddp_timeout: int = option(1800, "Seconds a process waits for the others (collectives, barriers) before failing.")
    nonfinite_loss: Literal["stop", "skip"] = option(
        "stop",
        "When the loss or gradient norm is NaN/inf: stop with a message naming the step (the last checkpoint stays "
        "usable), or skip that batch's update and go on.",
    )

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
        if self.deepspeed and self.fsdp:
            problems.append("deepspeed and fsdp are both set; pick one way of sharding")
        if self.ddp_timeout < 1:
            problems.append(f"ddp_timeout: got {self.ddp_timeout}; expected seconds >= 1")
        if self.bf16 and self.fp16:
            problems.append("bf16 and fp16 are both true; pick one")
        layers = self.gradient_checkpointing_layers
        if layers is not None and layers < 1:
            problems.append(f"gradient_checkpointing_layers: got {layers}; expected a positive number of layers")
        if layers is not None and self.gradient_checkpointing is False:
            problems.append(
                "gradient_checkpointing_layers is set but gradient_checkpointing is false; "
                "set gradient_checkpointing: true (or auto), or remove gradient_checkpointing_layers"
            )
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio: got {self.warmup_ratio}; expected a value in [0, 1)")
        return problems
