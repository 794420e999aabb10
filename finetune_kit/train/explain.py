"""``LoraTrainer.explain()``: the resolved plan of a run, printed before anything heavy happens."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from finetune_kit.models.adapters import is_peft
from finetune_kit.train.budget import describe_checkpointing
from finetune_kit.train.lora import count_lora_params, resolve_targets
from finetune_kit.train.methods import freeze_plan

if TYPE_CHECKING:
    from finetune_kit.data.tokenized import TokenizedDataset
    from finetune_kit.train.trainer import LoraTrainer

_OBJECTIVE = {
    "sft": "sft (supervised: loss on the replies)",
    "pt": "pt (pre-training: loss on every token)",
    "kto": "kto (TRL's KTOTrainer; reference = the base with the adapter off)",
}


def explain_trainer(trainer: LoraTrainer, tokens: TokenizedDataset | None) -> str:
    """Loading, stage, method and trained parameters, batch and optimizer, data and steps."""
    import torch

    t, m, lora = trainer.training, trainer.method, trainer.lora
    structure = trainer._structure()
    total = sum(p.numel() for p in structure.parameters())
    if m.finetuning_type == "lora":
        continued = trainer._continued_adapter()  # a saved adapter trained further: its own targets and rank
        if continued is not None:
            targets, rank, dora = continued
        else:
            targets = resolve_targets(structure, lora, continue_adapter=trainer._continues())
            rank, dora = lora.lora_rank, lora.use_dora
        trained = count_lora_params(structure, targets, rank, dora=dora)
        whole = total if is_peft(structure) else total + trained  # a loaded adapter is counted in total
        variants = [
            name
            for name, on in (
                ("DoRA", lora.use_dora),
                ("rsLoRA", lora.use_rslora),
                (
                    f"PiSSA init ({'exact SVD' if lora.pissa_iter == -1 else f'{lora.pissa_iter} SVD iterations'})",
                    lora.pissa_init,
                ),
                (f"LoRA+ (B lr x {lora.loraplus_lr_ratio})", lora.loraplus_lr_ratio is not None),
                ("new adapter on the merged ones", lora.create_new_adapter),
            )
            if on
        ]
        head = f"LoRA r={lora.lora_rank}, alpha={lora.alpha}, dropout={lora.lora_dropout}"
        if continued is not None or trainer._continues():
            head = "LoRA, training the model's last adapter further" + (f" (r={rank})" if continued else "")
        method = [
            f"method:           {head}" + (f"; {', '.join(variants)}" if variants else ""),
            f"targets:          {', '.join(targets)}",
        ]
    else:
        if m.finetuning_type == "full":
            trained, what = total, "every weight"
        else:
            fragments = freeze_plan(structure, m)
            trained = sum(p.numel() for n, p in structure.named_parameters() if any(f in f".{n}" for f in fragments))
            n = m.freeze_trainable_layers
            what = f"the {'last' if n > 0 else 'first'} {abs(n)} layer(s): {', '.join(m.freeze_trainable_modules)}"
            if m.freeze_extra_modules:
                what += f" + {', '.join(m.freeze_extra_modules)}"
        whole = total
        method = [f"method:           {m.finetuning_type} tuning of {what} (float32 weights, saved in full)"]
    devices = int(os.environ.get("WORLD_SIZE", "0")) or max(torch.cuda.device_count(), 1)
    effective = t.per_device_train_batch_size * t.gradient_accumulation_steps * devices
    plan = trainer.load_plan()
    lines = [
        plan.explain() if plan is not None else f"model:            {trainer.model!r} (loaded; left unchanged)",
        f"stage:            {_stage(trainer)}",
        *method,
        f"trainable params: {trained:,} of {whole:,} ({100 * trained / whole:.3f}%)",
        f"batch:            {t.per_device_train_batch_size} per device x {t.gradient_accumulation_steps} "
        f"accumulation x {devices} device(s) = {effective} per step",
        f"optimizer:        {t.optim}, lr {t.learning_rate}, {t.lr_scheduler_type} schedule, "
        f"precision {'bf16' if t.bf16 else 'fp16' if t.fp16 else 'fp32'}",
        f"checkpointing:    {describe_checkpointing(trainer, tokens)}",
        f"template:         {trainer._template_name()}, cutoff_len {trainer.encoding.cutoff_len}",
        f"output_dir:       {t.output_dir}",
    ]
    if tokens is not None:
        steps = (
            t.max_steps
            if t.max_steps > 0 or tokens.streaming
            else math.ceil(
                math.ceil(len(tokens) / (t.per_device_train_batch_size * devices))
                / t.gradient_accumulation_steps
                * t.num_train_epochs
            )
        )
        lines[-2:-2] = [f"data:             {tokens!r}", f"steps:            {steps}"]
    return "\n".join(lines)


def _stage(trainer: LoraTrainer) -> str:
    m, p = trainer.method, trainer.preference
    if m.stage != "dpo":
        text = _OBJECTIVE[m.stage]
        return text + (f", beta {p.pref_beta}" if m.stage == "kto" else "")
    if p.pref_loss == "orpo":
        text = "dpo with ORPO loss (TRL's ORPOTrainer; no reference model)"
    elif p.pref_loss == "simpo":
        text = f"dpo with SimPO loss (TRL's CPOTrainer; no reference model; gamma {p.simpo_gamma})"
    else:
        ref = "the base with the adapter off" if m.finetuning_type == "lora" else "a frozen copy of the start"
        text = f"dpo with {p.pref_loss} loss (TRL's DPOTrainer; reference = {ref})"
    return text + f", beta {p.pref_beta}" + (f", sft weight {p.pref_ftx}" if p.pref_ftx else "")
