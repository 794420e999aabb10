"""The training loop itself: peft + transformers.Trainer, then saving every artifact."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_kit.train.callbacks import JsonlLogCallback
from finetune_kit.train.trainer import save_json, tokenizer_for_saving

if TYPE_CHECKING:
    from finetune_kit.data.tokenize import TokenizedDataset
    from finetune_kit.train.config import TrainingConfig
    from finetune_kit.train.result import TrainResult
    from finetune_kit.train.trainer import LoraTrainer


def training_arguments(trainer: LoraTrainer, has_eval: bool) -> Any:
    import torch
    from transformers import TrainingArguments

    t = trainer.training
    warmup: float = t.warmup_steps if t.warmup_steps else t.warmup_ratio  # transformers reads <1 as a ratio
    eval_kwargs: dict[str, Any] = {}
    if has_eval:
        eval_kwargs = {"eval_strategy": "steps" if t.eval_steps else "epoch", "eval_steps": t.eval_steps}
    return TrainingArguments(
        output_dir=t.output_dir, learning_rate=t.learning_rate, num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps, per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=warmup, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, optim=t.optim,
        logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, bf16=t.bf16, fp16=t.fp16, seed=t.seed, data_seed=t.seed,
        report_to=list(t.report_to), dataloader_num_workers=t.dataloader_num_workers, disable_tqdm=t.disable_tqdm,
        remove_unused_columns=False, use_cpu=not torch.cuda.is_available(), include_num_input_tokens_seen=True,
        **_version_kwargs(t), **eval_kwargs,
    )


def _version_kwargs(t: TrainingConfig) -> dict[str, Any]:
    """Arguments whose names differ across transformers 5.x releases, under the name this version has."""
    import inspect

    from transformers import TrainingArguments

    names = inspect.signature(TrainingArguments.__init__).parameters
    kwargs: dict[str, Any] = {
        "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing":
            t.gradient_checkpointing}
    if t.group_by_length:
        if "train_sampling_strategy" in names:
            kwargs["train_sampling_strategy"] = "group_by_length"
        else:
            kwargs["group_by_length"] = True
    return kwargs


def attach_lora(trainer: LoraTrainer) -> Any:
    """Wrap the base model with fresh LoRA layers (or make its loaded adapter trainable)."""
    import peft
    import torch
    from transformers import set_seed

    set_seed(trainer.training.seed)
    model = trainer.model.model
    if isinstance(model, peft.PeftModel):
        for name, p in model.named_parameters():
            p.requires_grad = "lora_" in name
        peft_model = model
    else:
        cfg = peft.LoraConfig(
            task_type="CAUSAL_LM", r=trainer.lora.lora_rank, lora_alpha=trainer.lora.alpha,
            lora_dropout=trainer.lora.lora_dropout, target_modules=trainer.target_modules(),
            modules_to_save=list(trainer.lora.additional_target) if trainer.lora.additional_target else None,
            use_rslora=trainer.lora.use_rslora,
        )
        peft_model = peft.get_peft_model(model, cfg)
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # trainable weights stay fp32 under bf16/fp16 autocast
    if trainer.training.gradient_checkpointing:
        peft_model.enable_input_require_grads()
    return peft_model


def run_training(trainer: LoraTrainer, train_set: TokenizedDataset, eval_set: TokenizedDataset | None,
                 resume: str | None, *, datasets: tuple[str, ...] = ()) -> TrainResult:
    from transformers import DataCollatorForSeq2Seq, Trainer

    from finetune_kit.train.plot import plot_loss
    from finetune_kit.train.result import TrainResult

    out = Path(trainer.training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_for_saving(trainer.model)
    tokenizer.padding_side = "right"
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    fresh_lora = not hasattr(trainer.model.model, "peft_config")
    peft_model = attach_lora(trainer)
    try:
        hf = Trainer(model=peft_model, args=training_arguments(trainer, eval_set is not None),
                     train_dataset=train_set.dataset, eval_dataset=eval_set.dataset if eval_set else None,
                     data_collator=collator, processing_class=tokenizer, callbacks=[JsonlLogCallback(out)])
        output = hf.train(resume_from_checkpoint=resume)
        metrics = dict(output.metrics)
        if eval_set is not None:
            metrics.update(hf.evaluate())
        if hf.is_world_process_zero():
            hf.save_model(str(out))
            tokenizer.save_pretrained(out)
            hf.save_state()
            save_json(out / "train_results.json", metrics)
            save_json(out / "finetune_kit_config.json", trainer.run_config(datasets))
        plots: tuple[Path, ...] = ()
        if trainer.training.plot_loss and hf.is_world_process_zero():
            plots = tuple(plot_loss(hf.state.log_history, out))
        history = tuple(hf.state.log_history)
    finally:
        if fresh_lora:  # give the caller back the base model without LoRA layers
            base = peft_model.unload()
            if hasattr(base, "peft_config"):
                del base.peft_config
    return TrainResult(output_dir=out, base=trainer.model.source.with_config(adapter_name_or_path=None),
                       metrics=metrics, log_history=history, plots=plots)
