"""LoraTrainer: LoRA supervised fine-tuning through peft and transformers.Trainer (Accelerate placement)."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_kit.data.config import DataConfig
from finetune_kit.errors import ConfigError, OutputExistsError
from finetune_kit.train.config import LoraConfig, TrainingConfig

if TYPE_CHECKING:
    from finetune_kit.data.conversations import Conversations
    from finetune_kit.data.tokenize import TokenizedDataset
    from finetune_kit.models.loaded import LoadedModel
    from finetune_kit.train.result import TrainResult

_HEADS = {"lm_head", "output_layer", "output", "embed_out", "score"}


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of every linear layer except the output head (LLaMA-Factory's ``lora_target: all``)."""
    import torch

    names = set()
    for full, module in model.named_modules():
        leaf = full.split(".")[-1]
        if isinstance(module, torch.nn.Linear) and leaf not in _HEADS and "lora_" not in full:
            names.add(leaf)
    return sorted(names)


@dataclass(frozen=True)
class LoraTrainer:
    """Train a LoRA adapter on a loaded model.

    Every ``with_*`` call returns a new trainer; nothing runs until :meth:`train`.
    Example::

        trainer = (LoraTrainer(model)
                   .with_lora(lora_rank=8, lora_target="all")
                   .with_training(output_dir="saves/shop", learning_rate=1e-3, num_train_epochs=3))
        print(trainer.explain(data))
        result = trainer.train(data)
    """

    model: LoadedModel
    lora: LoraConfig = LoraConfig()
    training: TrainingConfig = TrainingConfig()
    data: DataConfig = field(default_factory=lambda: DataConfig(cutoff_len=1024))

    def __repr__(self) -> str:
        t = self.training
        return (f"LoraTrainer({self.model.source.display_name}, r={self.lora.lora_rank}, alpha={self.lora.alpha}, "
                f"lr={t.learning_rate}, output_dir={t.output_dir!r})")

    def with_lora(self, **changes: Any) -> LoraTrainer:
        """New trainer with :class:`LoraConfig` fields changed (lora_rank, lora_alpha, lora_target, ...)."""
        return replace(self, lora=self.lora.with_(**changes))

    def with_training(self, **changes: Any) -> LoraTrainer:
        """New trainer with :class:`TrainingConfig` fields changed (learning_rate, num_train_epochs, ...)."""
        return replace(self, training=self.training.with_(**changes))

    def with_data(self, **changes: Any) -> LoraTrainer:
        """New trainer with :class:`DataConfig` fields changed (cutoff_len, train_on_prompt, ...)."""
        return replace(self, data=self.data.with_(**changes))

    # ------------------------------------------------------------------ planning
    def target_modules(self) -> list[str]:
        if self.lora.lora_target == ("all",):
            return linear_module_names(self.model.model)
        available = linear_module_names(self.model.model)
        missing = [t for t in self.lora.lora_target if t not in available]
        if missing:
            raise ConfigError(f"lora_target names {missing} match no linear layer of this model. Available: "
                              f"{', '.join(available)} (or 'all')")
        return list(self.lora.lora_target)

    def _tokenized(self, data: Conversations | TokenizedDataset) -> TokenizedDataset:
        from finetune_kit.data.tokenize import TokenizedDataset

        if isinstance(data, TokenizedDataset):
            return data
        return data.tokenize(self.model, cutoff_len=self.data.cutoff_len, train_on_prompt=self.data.train_on_prompt,
                             mask_history=self.data.mask_history)

    def explain(self, data: Conversations | TokenizedDataset | None = None) -> str:
        """The resolved plan: targets, parameter counts, batch sizes and steps, before any training."""
        import math

        import torch

        t = self.training
        total = sum(p.numel() for p in self.model.model.parameters())
        targets = self.target_modules()
        lora_params = 0
        for name, module in self.model.model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in targets:
                lora_params += self.lora.lora_rank * (module.in_features + module.out_features)
        import torch.cuda

        devices = max(torch.cuda.device_count(), 1)
        effective = t.per_device_train_batch_size * t.gradient_accumulation_steps * devices
        lines = [
            f"model:            {self.model!r}",
            f"LoRA:             r={self.lora.lora_rank}, alpha={self.lora.alpha}, dropout={self.lora.lora_dropout}",
            f"targets:          {', '.join(targets)}",
            f"trainable params: {lora_params:,} of {total + lora_params:,} ({100 * lora_params / (total + lora_params):.3f}%)",
            f"batch:            {t.per_device_train_batch_size} per device x {t.gradient_accumulation_steps} "
            f"accumulation x {devices} device(s) = {effective} per step",
            f"optimizer:        {t.optim}, lr {t.learning_rate}, {t.lr_scheduler_type} schedule, "
            f"precision {'bf16' if t.bf16 else 'fp16' if t.fp16 else 'fp32'}",
            f"template:         {self.model.template.name}, cutoff_len {self.data.cutoff_len}",
            f"output_dir:       {t.output_dir}",
        ]
        if data is not None:
            tok = self._tokenized(data)
            steps = t.max_steps if t.max_steps > 0 else math.ceil(
                math.ceil(len(tok) / (t.per_device_train_batch_size * devices)) / t.gradient_accumulation_steps
                * t.num_train_epochs)
            lines.insert(6, f"data:             {tok!r}")
            lines.insert(7, f"steps:            {steps}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ training
    def train(self, data: Conversations | TokenizedDataset, eval_data: Conversations | TokenizedDataset | None = None,
              ) -> TrainResult:
        """Run LoRA SFT and write the adapter, tokenizer, config, log and plots to ``output_dir``.

        The model passed in is restored afterwards (LoRA layers removed); load the trained
        model with ``result.load()``.
        """
        from finetune_kit.environment import Environment
        from finetune_kit.train.run import run_training

        Environment.detect().require(bf16=self.training.bf16, fp16=self.training.fp16)
        out = Path(self.training.output_dir)
        resume = self._resume_point(out)
        return run_training(self, self._tokenized(data), self._tokenized(eval_data) if eval_data is not None else None,
                            resume, datasets=tuple(getattr(data, "names", ())))

    def _resume_point(self, out: Path) -> str | None:
        t = self.training
        if t.resume_from_checkpoint:
            if t.resume_from_checkpoint == "latest":
                return _last_checkpoint(out) or _no_checkpoint(out)
            if not Path(t.resume_from_checkpoint).is_dir():
                raise ConfigError(f"resume_from_checkpoint={t.resume_from_checkpoint!r} is not a folder. Fix: point it at "
                                  "a checkpoint-* folder inside a previous output_dir")
            return t.resume_from_checkpoint
        if not out.exists() or not any(out.iterdir()) or t.overwrite_output_dir:
            return None
        last = _last_checkpoint(out)
        if last:
            print(f"Resuming training from {last} (output_dir already has checkpoints). Change output_dir or set "
                  "overwrite_output_dir: true to start over.")
            return last
        raise OutputExistsError(f"output_dir {out} already exists and is not empty. Fix: choose a new output_dir, or "
                                "set overwrite_output_dir: true to write over it")

    def run_config(self, datasets: tuple[str, ...] = ()) -> dict[str, Any]:
        """Everything needed to reproduce the run, saved as finetune_kit_config.json."""
        from finetune_kit import __version__

        return {"finetune_kit_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "base_model": self.model.source.display_name, "datasets": list(datasets),
                "config": {"model": self.model.source.config.to_saved_dict(), "data": self.data.to_dict(),
                           "lora": self.lora.to_dict(), "training": self.training.to_dict()},
                "resolved": {"lora_target": self.target_modules(), "lora_alpha": self.lora.alpha,
                             "template": self.model.template.name}}


def _last_checkpoint(out: Path) -> str | None:
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return str(max(found, key=lambda p: int(p.name.split("-")[-1]))) if found else None


def _no_checkpoint(out: Path) -> str:
    raise ConfigError(f"resume_from_checkpoint: latest, but {out} has no checkpoint-* folder to resume from")


def save_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")


def tokenizer_for_saving(model: LoadedModel) -> Any:
    """A copy of the tokenizer whose chat_template renders the training template."""
    tok = copy.deepcopy(model.tokenizer)
    tok.chat_template = model.template.jinja()
    return tok
