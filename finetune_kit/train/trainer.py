"""LoraTrainer: fine-tuning of a model (LoRA, QLoRA, freeze or full; sft, pt, dpo or kto).

It loads what it trains, prepares the method, and hands the stage's trainer to the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_kit._artifacts import provenance
from finetune_kit.data.config import DataConfig, EncodingConfig
from finetune_kit.data.conversations import Conversations, ConversationStream
from finetune_kit.data.tokenize import TokenizedDataset
from finetune_kit.environment import Environment
from finetune_kit.errors import ConfigError, FinetuneKitError, did_you_mean
from finetune_kit.models.adapters import is_peft
from finetune_kit.models.loaded import LoadedModel
from finetune_kit.models.loader import LoadPlan, load_tokenizer, plan_load
from finetune_kit.models.quantize import check_quantization, is_quantized
from finetune_kit.models.source import ModelSource
from finetune_kit.train.budget import TrainingPlan, plan_trainer, resolve_checkpoint_layers
from finetune_kit.train.config import LoraConfig, MethodConfig, PreferenceConfig, TrainingConfig
from finetune_kit.train.distributed import check_sharding, forget_zero3, sharded, wait_for_everyone, world_size
from finetune_kit.train.explain import explain_trainer
from finetune_kit.train.held import Held
from finetune_kit.train.lora import resolve_targets, save_adapter, saved_adapter
from finetune_kit.train.loss import check_kernels
from finetune_kit.train.methods import prepare
from finetune_kit.train.outputs import check_resume, resume_point
from finetune_kit.train.result import TrainResult
from finetune_kit.train.run import fit, training_arguments
from finetune_kit.train.safety import training_error
from finetune_kit.train.stages import check_stage, objective
from finetune_kit.train.tokens import Data, check_encoding, tokenize_for

if TYPE_CHECKING:
    from finetune_kit.data.template import ChatTemplate

_SELECTION = set(DataConfig.field_names())


@dataclass(frozen=True)
class LoraTrainer:
    """Fine-tune a model: a :class:`ModelSource` (the trainer loads it, the way the training
    settings need) or an already loaded :class:`LoadedModel` (left unchanged).

    LoRA SFT by default; :meth:`with_quantization` makes it QLoRA, :meth:`with_freeze` and
    :meth:`with_full` train the weights themselves, :meth:`with_pretraining`, :meth:`with_dpo`
    and :meth:`with_kto` change the objective. Every ``with_*`` call returns a new trainer;
    nothing heavy runs until :meth:`tokenize` or :meth:`train`. Example::

        trainer = (LoraTrainer(ModelSource.bundled())
                   .with_lora(lora_rank=8, lora_target="all")
                   .with_training(output_dir="saves/shop", learning_rate=1e-3, num_train_epochs=3))
        tokens = trainer.tokenize(data)          # once; explain() and train() reuse it
        print(trainer.explain(tokens))
        result = trainer.train(tokens)

        dpo = trainer.with_dpo(pref_beta=0.1).with_training(output_dir="saves/dpo", learning_rate=5e-6)
        result = dpo.train(registry.load("dpo_en_demo", stage="dpo"))
    """

    model: LoadedModel | ModelSource
    lora: LoraConfig = LoraConfig()
    training: TrainingConfig = TrainingConfig()
    encoding: EncodingConfig = EncodingConfig(cutoff_len=1024)
    method: MethodConfig = MethodConfig()
    preference: PreferenceConfig = PreferenceConfig()
    _tokenized: dict[int, tuple[Conversations | ConversationStream, TokenizedDataset]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not isinstance(self.model, (LoadedModel, ModelSource)):
            raise TypeError(
                f"LoraTrainer needs a ModelSource or a LoadedModel, got {type(self.model).__name__}. "
                "Fix: LoraTrainer(ModelSource.bundled())"
            )
        if isinstance(self.model, ModelSource):
            check_quantization(self.model.config, path=self.model.local_path())
        if self.method.finetuning_type != "lora" and self._quantized():
            raise ConfigError(
                f"finetuning_type: {self.method.finetuning_type} cannot train quantized weights. Fix: use "
                "finetuning_type: lora (QLoRA), or load the model without quantization_bit"
            )

    def __repr__(self) -> str:
        t, m = self.training, self.method
        what = f"r={self.lora.lora_rank}, alpha={self.lora.alpha}" if m.finetuning_type == "lora" else m.finetuning_type
        stage = "" if m.stage == "sft" else f"{m.stage}, "
        return (
            f"LoraTrainer({self.source.display_name}, {stage}{what}, lr={t.learning_rate}, output_dir={t.output_dir!r})"
        )

    @property
    def source(self) -> ModelSource:
        """Where the trained model comes from."""
        return self.model if isinstance(self.model, ModelSource) else self.model.source

    def with_lora(self, **changes: Any) -> LoraTrainer:
        """New trainer training LoRA adapters, with :class:`LoraConfig` fields changed (lora_rank, lora_alpha,
        lora_target, use_dora, use_rslora, pissa_init, loraplus_lr_ratio, create_new_adapter, ...)."""
        return replace(self, lora=self.lora.with_(**changes), method=self.method.with_(finetuning_type="lora"))

    def with_freeze(self, **changes: Any) -> LoraTrainer:
        """New trainer doing freeze tuning: only some hidden layers train (freeze_trainable_layers,
        freeze_trainable_modules, freeze_extra_modules: LLaMA-Factory's keys)."""
        unknown = sorted(k for k in changes if not k.startswith("freeze_"))
        if unknown:
            raise ConfigError(f"with_freeze takes freeze_* keys only, got {unknown}")
        return replace(self, method=self.method.with_(finetuning_type="freeze", **changes))

    def with_full(self) -> LoraTrainer:
        """New trainer doing full fine-tuning: every weight trains (and the whole model is saved)."""
        return replace(self, method=self.method.with_(finetuning_type="full"))

    def with_quantization(self, **changes: Any) -> LoraTrainer:
        """New trainer loading the base in 4 or 8 bits for QLoRA (quantization_bit, quantization_type,
        double_quantization). Raises now on a machine without CUDA or bitsandbytes."""
        if not isinstance(self.model, ModelSource):
            raise ConfigError(
                "with_quantization needs a ModelSource: an already loaded model keeps its weights as they are. "
                "Fix: LoraTrainer(ModelSource...).with_quantization(quantization_bit=4)"
            )
        changes.setdefault("quantization_bit", 4)
        return replace(self, model=self.model.with_config(**changes))

    def with_stage(self, stage: str, **preference: Any) -> LoraTrainer:
        """New trainer for ``stage`` (sft, pt, dpo, kto) with :class:`PreferenceConfig` fields changed."""
        return replace(self, method=self.method.with_(stage=stage), preference=self.preference.with_(**preference))

    def with_pretraining(self) -> LoraTrainer:
        """New trainer continuing pre-training on plain text (stage pt: every token is trained)."""
        return self.with_stage("pt")

    def with_dpo(self, **preference: Any) -> LoraTrainer:
        """New trainer for preference pairs (stage dpo): pref_beta, pref_loss (sigmoid, hinge, ipo, orpo,
        simpo), pref_ftx, simpo_gamma, dpo_label_smoothing."""
        return self.with_stage("dpo", **preference)

    def with_kto(self, **preference: Any) -> LoraTrainer:
        """New trainer for liked/disliked replies (stage kto): pref_beta, kto_chosen_weight, kto_rejected_weight."""
        return self.with_stage("kto", **preference)

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
        t = self.training
        merge_all = self.method.finetuning_type != "lora" or self.lora.create_new_adapter
        return plan_load(self.model, purpose="training", bf16=t.bf16, fp16=t.fp16, merge_all_adapters=merge_all)

    def target_modules(self) -> list[str]:
        """The module names LoRA wraps (``lora_target: all`` = every linear layer but the head)."""
        continued = self._continued_adapter()
        if continued is not None:
            return continued[0]
        return resolve_targets(self._structure(), self.lora, continue_adapter=self._continues())

    def tokenize(self, data: Data) -> TokenizedDataset:
        """Encode ``data`` with the model's template, this trainer's encoding settings and stage, once.

        The result is remembered: :meth:`explain` and :meth:`train` given the same
        ``Conversations`` reuse it, and a ``TokenizedDataset`` is checked and passed through.
        Tokenization runs in ``preprocessing_num_workers`` processes and is cached on disk (a
        second run with the same data, tokenizer, template and options reads it back;
        ``overwrite_cache`` tokenizes again); ``tokenized_path`` names the folder explicitly.
        """
        return self._tokenize(data, keep=True)

    def _tokenize(self, data: Data, *, keep: bool) -> TokenizedDataset:
        """:meth:`tokenize`; ``keep`` says whether ``tokenized_path`` (the training data's folder) applies."""
        return tokenize_for(self, data, keep=keep)

    def explain(self, data: Data | None = None) -> str:
        """The resolved plan: loading, method, trained parameters, batch sizes and steps, before training."""
        return explain_trainer(self, self.tokenize(data) if data is not None else None)

    def plan(self, data: Data | None = None, *, gpus: int | None = None) -> TrainingPlan:
        """Estimated peak GPU memory per GPU, before any weight is loaded (only config.json is read),
        whether it fits the visible GPUs and, if not, the cheapest changes that fit.

        ``data`` sizes the padded length by its longest row (else ``cutoff_len``); ``gpus`` is the
        number of training processes (default: the launched ones, 1 alone). Example::

            print(trainer.plan(tokens))          # parts, total, fits: yes/NO and what to try
        """
        return plan_trainer(self, self.tokenize(data) if data is not None else None, gpus=gpus)

    def train(self, data: Data, eval_data: Data | None = None) -> TrainResult:
        """Train and write the adapter (or the whole model for freeze/full tuning), tokenizer, provenance,
        log and plots to ``output_dir``.

        A :class:`LoadedModel` passed to the trainer is not changed: training runs on a copy of
        its module tree that shares the weights it does not write. The trained model stays in
        memory on the returned :class:`TrainResult` (``result.load()``).
        """
        t, m = self.training, self.method
        Environment.detect().require(bf16=t.bf16, fp16=t.fp16)
        check_sharding(t)  # here, not when built: plan() of a DeepSpeed run works on any machine
        _check_optim(t.optim)
        check_kernels(enable_liger_kernel=t.enable_liger_kernel, stage=m.stage, padding_free=t.padding_free)
        for given in (data, eval_data):
            if isinstance(given, TokenizedDataset):
                self._check_encoding(given)
        out = Path(t.output_dir)
        resume = resume_point(t, out)
        if resume is not None:
            check_resume(resume, t, world_size())
        train_set = self.tokenize(data)
        eval_set = self._tokenize(eval_data, keep=False) if eval_data is not None else None
        wait_for_everyone()  # launched: every process has looked at output_dir before rank 0 writes there
        check_stage(m, per_device_train_batch_size=t.per_device_train_batch_size, streaming=train_set.streaming)
        checkpointing, layers = resolve_checkpoint_layers(self, train_set)
        t = t.with_(gradient_checkpointing=checkpointing, gradient_checkpointing_layers=layers)
        goal = objective(m, self.preference, self.lora)
        # before loading: Accelerate's state lives in the arguments
        args = training_arguments(t, has_eval=eval_set is not None, cls=goal.arguments, **goal.arguments_kwargs)
        try:
            held = Held.take(
                self.model,
                self.load_plan(),
                m,
                self.lora,
                lambda module: resolve_targets(module, self.lora, continue_adapter=self._continues()),
            )
        except FinetuneKitError:
            raise
        except Exception as exc:  # out of memory while loading, a broken weights file, ...
            raise training_error(exc, out=out) from exc
        try:
            targets = (
                resolve_targets(held.module, self.lora, continue_adapter=self._continues())
                if m.finetuning_type == "lora"
                else []
            )
            trained = prepare(held.module, m, self.lora, targets, seed=t.seed, gradient_checkpointing=checkpointing)
            base = held.base_source
            lora = m.finetuning_type == "lora"
            adapters = (*(base.config.adapter_name_or_path or ()), str(out)) if lora else ()
            record = provenance(
                "train",
                model=base.display_name,
                adapters=adapters,
                template=held.template.name,
                datasets=_names(data),
                config={
                    "model": base.config.to_saved_dict(),
                    "encoding": self.encoding.to_dict(),
                    "method": m.to_dict(),
                    "lora": self.lora.to_dict(),
                    "preference": self.preference.to_dict(),
                    "training": t.to_dict(),
                },
                resolved={"lora_target": targets, "lora_alpha": self.lora.alpha, "template": held.template.name},
            )
            saving = held.loaded.tokenizer_with_template()
            saving.padding_side = "right"
            pissa = save_adapter(trained, self.lora, out) if lora and self.lora.pissa_init else None
            fitted = fit(
                trained,
                goal,
                args,
                train_set,
                eval_set,
                t=t,
                tokenizer=saving,
                out=out,
                resume=resume,
                record=record,
                save=pissa,
            )
        finally:
            held.restore()
            if sharded(t):  # later loads in this process (result.load(), predict) are whole models again
                forget_zero3()
        return TrainResult(
            output_dir=out,
            base=base,
            metrics=fitted.metrics,
            log_history=fitted.log_history,
            plots=fitted.plots,
            # sharded (ZeRO-3/FSDP) weights are not a usable model in one process: load() reads output_dir
            model=None if sharded(t) else _tuned(held, trained, base, adapters, out),
            finetuning_type=m.finetuning_type,
        )

    def _quantized(self) -> bool:
        if isinstance(self.model, LoadedModel):
            return is_quantized(self.model.model)
        return self.model.config.quantization_bit is not None

    def _continued_adapter(self) -> tuple[list[str], int, bool] | None:
        """Targets, rank and DoRA of the saved adapter a ``ModelSource`` trainer continues (None otherwise)."""
        if not isinstance(self.model, ModelSource) or not self._continues():
            return None
        return saved_adapter(self.model.config.adapter_name_or_path[-1])  # type: ignore[index]

    def _continues(self) -> bool:
        """True when training continues the model's last adapter (rather than a fresh one)."""
        if self.method.finetuning_type != "lora" or self.lora.create_new_adapter:
            return False
        if isinstance(self.model, LoadedModel):
            return is_peft(self.model.model)
        return bool(self.model.config.adapter_name_or_path)

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
        check_encoding(self, data)


def _tuned(held: Held, trained: Any, base: ModelSource, adapters: tuple[str, ...], out: Path) -> LoadedModel:
    """The trained model as a :class:`LoadedModel`: base + adapters, or the saved full model's folder."""
    if adapters:
        source = base.with_config(adapter_name_or_path=adapters)
    else:
        keep = {"template": held.template.name, "default_system": base.config.default_system}
        source = ModelSource.local(out).with_config(**{k: v for k, v in keep.items() if v is not None})
    return LoadedModel(
        source=source, model=trained, tokenizer=held.loaded.tokenizer, template=held.template, adapters=adapters
    )


_SELECTION_FIX = {
    "dataset": "load it with DatasetRegistry.from_dir(dir).load('name') and pass it to train()",
    "eval_dataset": "load it with DatasetRegistry.load('name') and pass it as train(data, eval_data)",
    "dataset_dir": "read it with DatasetRegistry.from_dir(dataset_dir)",
    "max_samples": "use registry.load('name', max_samples=N) or conversations.head(N)",
    "val_size": "split the data: train, val = conversations.split(val_size); trainer.train(train, val)",
}


def _check_optim(name: str) -> None:
    from transformers.training_args import OptimizerNames

    known = [o.value for o in OptimizerNames]
    if name not in known:
        raise ConfigError(
            f"optim: got {name!r}; expected an optimizer name transformers knows, such as adamw_torch."
            f"{did_you_mean(name, known)}"
        )


def _names(data: Data) -> tuple[str, ...]:
    return tuple(data.names)
