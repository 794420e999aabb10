"""LoraTrainer: LoRA supervised fine-tuning; it loads what it trains, attaches LoRA and runs the loop."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_kit._artifacts import provenance
from finetune_kit.data.cache import tokenize_cached
from finetune_kit.data.config import DataConfig, EncodingConfig
from finetune_kit.data.conversations import Conversations, ConversationStream
from finetune_kit.data.stream import tokenize_stream
from finetune_kit.data.tokenize import TokenizedDataset
from finetune_kit.environment import Environment
from finetune_kit.errors import ConfigError, FinetuneKitWarning, OutputExistsError, did_you_mean
from finetune_kit.models.adapters import is_peft, shared_clone
from finetune_kit.models.loaded import LoadedModel
from finetune_kit.models.loader import LoadPlan, load_model, load_tokenizer, plan_load
from finetune_kit.models.source import ModelSource
from finetune_kit.train.config import LoraConfig, TrainingConfig
from finetune_kit.train.lora import attach_lora, count_lora_params, resolve_targets
from finetune_kit.train.result import TrainResult
from finetune_kit.train.run import fit, training_arguments

if TYPE_CHECKING:
    from finetune_kit.data.template import ChatTemplate

Data = Conversations | ConversationStream | TokenizedDataset
_SELECTION = set(DataConfig.field_names())


@dataclass(frozen=True)
class LoraTrainer:
    """Train a LoRA adapter on a model: a :class:`ModelSource` (the trainer loads it, the way the
    training settings need) or an already loaded :class:`LoadedModel` (left unchanged).

    Every ``with_*`` call returns a new trainer; nothing heavy runs until :meth:`tokenize` or
    :meth:`train`. Example::

        trainer = (LoraTrainer(ModelSource.bundled())
                   .with_lora(lora_rank=8, lora_target="all")
                   .with_training(output_dir="saves/shop", learning_rate=1e-3, num_train_epochs=3))
        tokens = trainer.tokenize(data)          # once; explain() and train() reuse it
        print(trainer.explain(tokens))
        result = trainer.train(tokens)
    """

    model: LoadedModel | ModelSource
    lora: LoraConfig = LoraConfig()
    training: TrainingConfig = TrainingConfig()
    encoding: EncodingConfig = EncodingConfig(cutoff_len=1024)
    _tokenized: dict[int, tuple[Conversations | ConversationStream, TokenizedDataset]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not isinstance(self.model, (LoadedModel, ModelSource)):
            raise TypeError(
                f"LoraTrainer needs a ModelSource or a LoadedModel, got {type(self.model).__name__}. "
                "Fix: LoraTrainer(ModelSource.bundled())"
            )

    def __repr__(self) -> str:
        t = self.training
        return (
            f"LoraTrainer({self.source.display_name}, r={self.lora.lora_rank}, alpha={self.lora.alpha}, "
            f"lr={t.learning_rate}, output_dir={t.output_dir!r})"
        )

    @property
    def source(self) -> ModelSource:
        """Where the trained model comes from."""
        return self.model if isinstance(self.model, ModelSource) else self.model.source

    def with_lora(self, **changes: Any) -> LoraTrainer:
        """New trainer with :class:`LoraConfig` fields changed (lora_rank, lora_alpha, lora_target, ...)."""
        return replace(self, lora=self.lora.with_(**changes))

    def with_training(self, **changes: Any) -> LoraTrainer:
        """New trainer with :class:`TrainingConfig` fields changed (learning_rate, num_train_epochs, ...)."""
        return replace(self, training=self.training.with_(**changes))

    def with_data(self, **changes: Any) -> LoraTrainer:
        """New trainer with :class:`EncodingConfig` fields changed (cutoff_len, train_on_prompt, mask_history).

        Which data to use is not the trainer's business: keys such as ``val_size`` or ``dataset``
        are an error here; choose the data with ``DatasetRegistry.load(...)`` and ``.split(...)``.
        """
        selection = sorted(set(changes) & _SELECTION)
        if selection:
            raise ConfigError(
                [
                    f"with_data({k}=...): '{k}' selects data, which the trainer does not do. Fix: " + _SELECTION_FIX[k]
                    for k in selection
                ]
            )
        return replace(self, encoding=self.encoding.with_(**changes))

    def load_plan(self) -> LoadPlan | None:
        """How :meth:`train` will load the model (None when it was given an already loaded model)."""
        if isinstance(self.model, LoadedModel):
            return None
        return plan_load(self.model, purpose="training", bf16=self.training.bf16, fp16=self.training.fp16)

    def target_modules(self) -> list[str]:
        """The module names LoRA wraps (``lora_target: all`` = every linear layer but the head)."""
        return resolve_targets(self._structure(), self.lora)

    def tokenize(self, data: Data) -> TokenizedDataset:
        """Encode ``data`` with the model's template and this trainer's encoding settings, once.

        The result is remembered: :meth:`explain` and :meth:`train` given the same
        ``Conversations`` reuse it, and a ``TokenizedDataset`` is checked and passed through.
        Tokenization runs in ``preprocessing_num_workers`` processes and is cached on disk (a
        second run with the same data, tokenizer, template and options reads it back;
        ``overwrite_cache`` tokenizes again); ``tokenized_path`` names the folder explicitly.
        """
        return self._tokenize(data, keep=True)

    def _tokenize(self, data: Data, *, keep: bool) -> TokenizedDataset:
        """:meth:`tokenize`; ``keep`` says whether ``tokenized_path`` (the training data's folder) applies."""
        if isinstance(data, TokenizedDataset):
            self._check_encoding(data)
            return data
        if not isinstance(data, (Conversations, ConversationStream)):
            raise TypeError(
                "expected Conversations (DatasetRegistry.load(...)), a ConversationStream "
                f"(DatasetRegistry.stream(...)) or a TokenizedDataset, got {type(data).__name__}"
            )
        cached = self._tokenized.get(id(data))
        if cached is not None and cached[0] is data:
            return cached[1]
        tokenizer, template = self._tokenizer()
        e = self.encoding
        if isinstance(data, ConversationStream):
            if self.training.max_steps <= 0:
                raise ConfigError(
                    "streamed data has no length to count epochs by. Fix: set max_steps (as LLaMA-Factory requires)"
                )
            if self.training.group_by_length:
                raise ConfigError("group_by_length needs every example up front. Fix: turn it off for streamed data")
            stream = tokenize_stream(
                data,
                tokenizer,
                template,
                cutoff_len=e.cutoff_len,
                train_on_prompt=e.train_on_prompt,
                mask_history=e.mask_history,
            )
            self._tokenized[id(data)] = (data, stream)
            return stream
        done = tokenize_cached(
            data,
            tokenizer,
            template,
            cutoff_len=e.cutoff_len,
            train_on_prompt=e.train_on_prompt,
            mask_history=e.mask_history,
            num_workers=e.preprocessing_num_workers or 1,
            cache=not e.overwrite_cache,
            tokenized_path=e.tokenized_path if keep else None,
        )
        self._tokenized[id(data)] = (data, done)
        return done

    def explain(self, data: Data | None = None) -> str:
        """The resolved plan: loading, targets, parameter counts, batch sizes and steps, before training."""
        import torch

        t = self.training
        structure = self._structure()
        total = sum(p.numel() for p in structure.parameters())
        targets = resolve_targets(structure, self.lora)
        lora_params = count_lora_params(structure, targets, self.lora.lora_rank)
        whole = total if is_peft(structure) else total + lora_params  # a loaded adapter is counted in total
        devices = _world_size() or max(torch.cuda.device_count(), 1)
        effective = t.per_device_train_batch_size * t.gradient_accumulation_steps * devices
        plan = self.load_plan()
        lines = [
            plan.explain() if plan is not None else f"model:            {self.model!r} (loaded; left unchanged)",
            f"LoRA:             r={self.lora.lora_rank}, alpha={self.lora.alpha}, dropout={self.lora.lora_dropout}",
            f"targets:          {', '.join(targets)}",
            f"trainable params: {lora_params:,} of {whole:,} ({100 * lora_params / whole:.3f}%)",
            f"batch:            {t.per_device_train_batch_size} per device x {t.gradient_accumulation_steps} "
            f"accumulation x {devices} device(s) = {effective} per step",
            f"optimizer:        {t.optim}, lr {t.learning_rate}, {t.lr_scheduler_type} schedule, "
            f"precision {'bf16' if t.bf16 else 'fp16' if t.fp16 else 'fp32'}",
            f"template:         {self._template_name()}, cutoff_len {self.encoding.cutoff_len}",
            f"output_dir:       {t.output_dir}",
        ]
        if data is not None:
            tok = self.tokenize(data)
            steps = (
                t.max_steps
                if t.max_steps > 0 or tok.streaming
                else math.ceil(
                    math.ceil(len(tok) / (t.per_device_train_batch_size * devices))
                    / t.gradient_accumulation_steps
                    * t.num_train_epochs
                )
            )
            lines.insert(6, f"data:             {tok!r}")
            lines.insert(7, f"steps:            {steps}")
        return "\n".join(lines)

    def train(self, data: Data, eval_data: Data | None = None) -> TrainResult:
        """Run LoRA SFT and write the adapter, tokenizer, provenance, log and plots to ``output_dir``.

        A :class:`LoadedModel` passed to the trainer is not changed: LoRA is attached to a copy
        of its module tree that shares the weights. The trained model stays in memory on the
        returned :class:`TrainResult` (``result.load()``).
        """
        t = self.training
        Environment.detect().require(bf16=t.bf16, fp16=t.fp16)
        _check_optim(t.optim)
        for given in (data, eval_data):
            if isinstance(given, TokenizedDataset):
                self._check_encoding(given)
        out = Path(t.output_dir)
        resume = self._resume_point(out)
        train_set = self.tokenize(data)
        eval_set = self._tokenize(eval_data, keep=False) if eval_data is not None else None
        args = training_arguments(t, has_eval=eval_set is not None)  # before loading: Accelerate's state lives here
        held = _Held.take(self.model, self.load_plan())
        try:
            targets = resolve_targets(held.module, self.lora)
            peft_model = attach_lora(
                held.module, self.lora, targets, seed=t.seed, gradient_checkpointing=t.gradient_checkpointing
            )
            base = held.base_source
            adapters = (*(base.config.adapter_name_or_path or ()), str(out))
            record = provenance(
                "train",
                model=base.display_name,
                adapters=adapters,
                template=held.template.name,
                datasets=_names(data),
                config={
                    "model": base.config.to_saved_dict(),
                    "encoding": self.encoding.to_dict(),
                    "lora": self.lora.to_dict(),
                    "training": t.to_dict(),
                },
                resolved={"lora_target": targets, "lora_alpha": self.lora.alpha, "template": held.template.name},
            )
            saving = held.loaded.tokenizer_with_template()
            saving.padding_side = "right"
            fitted = fit(
                peft_model,
                args,
                train_set,
                eval_set,
                tokenizer=saving,
                out=out,
                resume=resume,
                record=record,
                plot=t.plot_loss,
            )
        finally:
            held.restore()
        tuned = LoadedModel(
            source=base.with_config(adapter_name_or_path=adapters),
            model=peft_model,
            tokenizer=held.loaded.tokenizer,
            template=held.template,
            adapters=adapters,
        )
        return TrainResult(
            output_dir=out,
            base=base,
            metrics=fitted.metrics,
            log_history=fitted.log_history,
            plots=fitted.plots,
            model=tuned,
        )

    def _structure(self) -> Any:
        """The model's module tree: the loaded one, or an empty (meta-device) copy built from its config."""
        if isinstance(self.model, LoadedModel):
            return self.model.model
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(self.model.resolve(), trust_remote_code=self.model.config.trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg, trust_remote_code=self.model.config.trust_remote_code)

    def _tokenizer(self) -> tuple[Any, ChatTemplate]:
        if isinstance(self.model, LoadedModel):
            return self.model.tokenizer, self.model.template
        plan = self.load_plan()
        assert plan is not None
        return load_tokenizer(self.model, self.model.resolve(), plan)

    def _template_name(self) -> str:
        if isinstance(self.model, LoadedModel):
            return self.model.template.name
        plan = self.load_plan()
        return (plan.template if plan is not None else None) or "the tokenizer's own"

    def _check_encoding(self, data: TokenizedDataset) -> None:
        e, template = self.encoding, self._template_name()
        made = (data.cutoff_len, data.train_on_prompt, data.mask_history)
        if made != (e.cutoff_len, e.train_on_prompt, e.mask_history) or (
            data.template and template and data.template != template and not template.startswith("the ")
        ):
            raise ConfigError(
                f"this TokenizedDataset was encoded with template={data.template}, cutoff_len={data.cutoff_len}, "
                f"train_on_prompt={data.train_on_prompt}, mask_history={data.mask_history}, but the trainer uses "
                f"template={template}, cutoff_len={e.cutoff_len}, train_on_prompt={e.train_on_prompt}, "
                f"mask_history={e.mask_history}. Fix: tokenize with this trainer: trainer.tokenize(conversations)"
            )

    def _resume_point(self, out: Path) -> str | None:
        t = self.training
        if t.resume_from_checkpoint:
            if t.resume_from_checkpoint == "latest":
                last = last_checkpoint(out)
                if last is None:
                    raise ConfigError(
                        f"resume_from_checkpoint: latest, but {out} has no checkpoint-* folder to resume from"
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
        if last:
            warnings.warn(
                f"Resuming training from {last} (output_dir already has checkpoints). Change output_dir or "
                "set overwrite_output_dir: true to start over.",
                FinetuneKitWarning,
                stacklevel=3,
            )
            return last
        raise OutputExistsError(
            f"output_dir {out} already exists and is not empty. Fix: choose a new output_dir, or "
            "set overwrite_output_dir: true to write over it"
        )


_SELECTION_FIX = {
    "dataset": "load it with DatasetRegistry.from_dir(dir).load('name') and pass it to train()",
    "eval_dataset": "load it with DatasetRegistry.load('name') and pass it as train(data, eval_data)",
    "dataset_dir": "read it with DatasetRegistry.from_dir(dataset_dir)",
    "max_samples": "use registry.load('name', max_samples=N) or conversations.head(N)",
    "val_size": "split the data: train, val = conversations.split(val_size); trainer.train(train, val)",
}


@dataclass
class _Held:
    """The module tree the trainer attaches LoRA to, and how to give the caller's model back untouched."""

    loaded: LoadedModel
    module: Any
    base_source: ModelSource
    grad_flags: list[tuple[Any, bool]]

    @property
    def template(self) -> ChatTemplate:
        return self.loaded.template

    @classmethod
    def take(cls, model: LoadedModel | ModelSource, plan: LoadPlan | None) -> _Held:
        if isinstance(model, ModelSource):
            assert plan is not None
            loaded = load_model(model, plan)
            return cls(loaded, loaded.model, _base_of(loaded), [])
        # the caller's model: a copy of its modules that shares the weights (a continued adapter is copied)
        flags = [(p, p.requires_grad) for p in model.model.parameters()]
        copy_if = (lambda name: "lora_" in name) if is_peft(model.model) else (lambda name: False)
        return cls(model, shared_clone(model.model, copy_if=copy_if), _base_of(model), flags)

    def restore(self) -> None:
        for p, flag in self.grad_flags:
            p.requires_grad_(flag)


def _base_of(loaded: LoadedModel) -> ModelSource:
    """The source of the model the trained adapter applies to: a continued (last) adapter is replaced."""
    kept = loaded.adapters[:-1]
    return loaded.source.with_config(adapter_name_or_path=kept or None)


def last_checkpoint(out: Path) -> str | None:
    """The ``checkpoint-N`` folder with the highest N in ``out``, if any."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return str(max(found, key=lambda p: int(p.name.split("-")[-1]))) if found else None


def _check_optim(name: str) -> None:
    from transformers.training_args import OptimizerNames

    known = [o.value for o in OptimizerNames]
    if name not in known:
        raise ConfigError(
            f"optim: got {name!r}; expected an optimizer name transformers knows, such as adamw_torch."
            f"{did_you_mean(name, known)}"
        )


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "0"))


def _names(data: Data) -> tuple[str, ...]:
    return tuple(data.names)
