"""The objective of each stage: which trainer class runs it, with which arguments, on which columns.

``sft`` and ``pt`` run on ``transformers.Trainer`` (the collator of the :class:`TokenizedDataset`).
``dpo`` and ``kto`` run on TRL's trainers: TRL computes the losses and the reference model
(the base with the adapter switched off, so there is no second copy in memory; a frozen copy
for full fine-tuning). finetune_kit's own LLaMA-Factory-exact encoding is handed to TRL as it
is — TRL's tokenization is skipped — so the template is the same in every stage.

=============  ============================================  ==========================
pref_loss      TRL trainer                                   reference model
=============  ============================================  ==========================
sigmoid        ``DPOTrainer`` (+ ``sft`` loss for pref_ftx)    base, adapter off
hinge, ipo     ``DPOTrainer``                                base, adapter off
orpo           ``trl.experimental.orpo.ORPOTrainer``         none
simpo          ``trl.experimental.cpo.CPOTrainer`` (simpo)   none
=============  ============================================  ==========================
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

from finetune_kit.data.encode import IGNORE_INDEX
from finetune_kit.errors import ConfigError
from finetune_kit.train.config import LoraConfig, MethodConfig, PreferenceConfig

# ORPO/CPO batches hold chosen_/rejected_ columns, not input_ids: transformers cannot count their tokens
_NO_TOKEN_COUNT = {"include_num_input_tokens_seen": False}


@dataclass(frozen=True)
class Objective:
    """How a stage trains: the trainer class, its arguments class and the extra arguments for both."""

    trainer: type
    arguments: type
    arguments_kwargs: dict[str, Any]
    collates: bool  # True when finetune_kit's collator batches the data (sft/pt); TRL's own otherwise


def objective(method: MethodConfig, pref: PreferenceConfig, lora: LoraConfig) -> Objective:
    """The trainer and arguments of ``method.stage`` (TRL is imported only for dpo/kto)."""
    from transformers import Trainer, TrainingArguments

    stage = method.stage
    if stage in ("sft", "pt"):
        return Objective(_with_loraplus(Trainer, lora), TrainingArguments, {}, collates=True)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    # raised inside TRL's training step by a torch API TRL still uses; nothing the user can act on
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script_method.*", category=DeprecationWarning)
    common: dict[str, Any] = {"beta": pref.pref_beta}
    if stage == "kto":
        from trl import KTOConfig, KTOTrainer

        kto = _kto_trainer(KTOTrainer, lora.pissa_init)
        kwargs = {
            **common,
            "desirable_weight": pref.kto_chosen_weight,
            "undesirable_weight": pref.kto_rejected_weight,
            "max_length": None,
            "train_sampling_strategy": "sequential",  # TRL's check; see _kto_trainer
        }
        return Objective(_with_loraplus(kto, lora), KTOConfig, kwargs, collates=False)
    if pref.pref_loss == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        kwargs = {**common, **_NO_TOKEN_COUNT, "max_length": None, "max_completion_length": None}
        return Objective(_with_loraplus(_pretokenized(ORPOTrainer), lora), ORPOConfig, kwargs, collates=False)
    if pref.pref_loss == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        kwargs = {
            **common,
            **_NO_TOKEN_COUNT,
            "loss_type": "simpo",
            "simpo_gamma": pref.simpo_gamma,
            "cpo_alpha": pref.pref_ftx,
            "max_length": None,
            "max_completion_length": None,
        }
        return Objective(_with_loraplus(_pretokenized(CPOTrainer), lora), CPOConfig, kwargs, collates=False)
    from trl import DPOConfig, DPOTrainer

    losses: list[str] = [pref.pref_loss]
    weights = [1.0]
    if pref.pref_ftx:
        losses, weights = [*losses, "sft"], [*weights, pref.pref_ftx]
    kwargs = {
        **common,
        "loss_type": losses,
        "loss_weights": weights,
        "label_smoothing": pref.dpo_label_smoothing,
        "max_length": None,
    }
    return Objective(_with_loraplus(_dpo_trainer(DPOTrainer, lora.pissa_init), lora), DPOConfig, kwargs, collates=False)


def check_stage(method: MethodConfig, *, per_device_train_batch_size: int, streaming: bool) -> None:
    """Cross-setting rules of a stage, raised before anything loads."""
    problems = []
    if method.stage in ("dpo", "kto") and streaming:
        problems.append(f"stage: {method.stage} reads its data up front. Fix: set streaming: false")
    if method.stage == "kto" and per_device_train_batch_size < 2:
        problems.append(
            "stage: kto estimates its KL term within a batch, so it needs per_device_train_batch_size of 2 or "
            "more (TRL's rule). Fix: per_device_train_batch_size: 2"
        )
    if problems:
        raise ConfigError(problems)


def _prompt_length(labels: list[int]) -> int:
    """How many leading label positions are masked: the prompt's length in an encoded row."""
    n = 0
    for t in labels:
        if t != IGNORE_INDEX:
            break
        n += 1
    return n


def pairwise_for_dpo(row: dict[str, Any]) -> dict[str, Any]:
    """An encoded preference row (``chosen_*``/``rejected_*``) as TRL's prompt/chosen/rejected ids."""
    n = _prompt_length(row["chosen_labels"])
    m = _prompt_length(row["rejected_labels"])
    return {
        "prompt_ids": row["chosen_input_ids"][:n],
        "chosen_ids": row["chosen_input_ids"][n:],
        "rejected_ids": row["rejected_input_ids"][m:],
    }


def kto_for_trl(row: dict[str, Any]) -> dict[str, Any]:
    """An encoded KTO row (with LLaMA-Factory's precomputed KL pairing) as TRL's KTO columns."""
    n = _prompt_length(row["labels"])
    k = _prompt_length(row["kl_labels"])
    return {
        "prompt_ids": row["input_ids"][:n],
        "completion_ids": row["input_ids"][n:],
        "KL_completion_ids": row["kl_input_ids"][k:],
        "label": bool(row["kto_tags"]),
    }


def pairwise_for_cpo(row: dict[str, Any]) -> dict[str, Any]:
    """An encoded preference row in the column layout of TRL's ORPO/CPO trainers (already padded per pair)."""
    n = _prompt_length(row["chosen_labels"])
    return {
        "prompt_input_ids": row["chosen_input_ids"][:n],
        "prompt_attention_mask": [1] * n,
        **{f"{side}_{key}": row[f"{side}_{key}"] for side in ("chosen", "rejected") for key in _KEYS},
    }


_KEYS = ("input_ids", "attention_mask", "labels")


def _reference_is_base(trainer: Any, keep_reference_adapter: bool) -> None:
    """Drop the frozen "ref" adapter TRL copies from a PEFT model, so the reference is the base with the
    adapter switched off (LLaMA-Factory's reference; no copy). PiSSA keeps it: there the base weights hold
    the residual, and only base + initial adapter equals the starting model."""
    model = trainer.model
    if keep_reference_adapter or not hasattr(model, "peft_config") or "ref" not in model.peft_config:
        return
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.delete_adapter("ref")
    model.set_adapter("default")
    for name, p in model.named_parameters():
        p.requires_grad_(flags.get(name, False))


def _dpo_trainer(base: type, keep_reference_adapter: bool) -> type:
    class DPOOnEncoded(base):
        """TRL's DPO trainer fed finetune_kit's encoded pairs (TRL's own tokenization skipped)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            _reference_is_base(self, keep_reference_adapter)

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            return dataset.map(pairwise_for_dpo, remove_columns=dataset.column_names, desc=f"{dataset_name} pairs")

    return DPOOnEncoded


def _kto_trainer(base: type, keep_reference_adapter: bool) -> type:
    class KTOOnEncoded(base):
        """TRL's KTO trainer fed finetune_kit's encoded rows.

        The KL completion of each row is fixed in the data (LLaMA-Factory's pairing with the
        previous row's reply), so, unlike TRL's neighbour pairing, the order may be shuffled:
        TRL's "sequential" requirement is met at construction and the user's order restored.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.args.train_sampling_strategy = "random"
            _reference_is_base(self, keep_reference_adapter)

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            return dataset.map(kto_for_trl, remove_columns=dataset.column_names, desc=f"{dataset_name} rows")

    return KTOOnEncoded


def _pretokenized(base: type) -> type:
    class OnEncoded(base):
        """TRL's ORPO/CPO trainer fed finetune_kit's encoded pairs (its ``tokenize_row`` passes them through)."""

        def tokenize_row(self, feature: dict[str, Any], model: Any = None) -> dict[str, Any]:
            return pairwise_for_cpo(feature)

    OnEncoded.__name__ = base.__name__ + "OnEncoded"
    return OnEncoded


def _with_loraplus(base: type, lora: LoraConfig) -> type:
    """``base`` whose optimizer gives LoRA's B matrices ``loraplus_lr_ratio`` x the learning rate (peft's LoRA+)."""
    if lora.loraplus_lr_ratio is None:
        return base
    ratio, embedding_lr = lora.loraplus_lr_ratio, lora.loraplus_lr_embedding

    class WithLoraPlus(base):
        def create_optimizer(self, model: Any = None) -> Any:
            if getattr(self, "optimizer", None) is None:
                from peft.optimizers import create_loraplus_optimizer
                from transformers import Trainer

                target = model if model is not None else self.model
                cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, target)
                kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
                self.optimizer = create_loraplus_optimizer(
                    target,
                    cls,
                    lr=self.args.learning_rate,
                    loraplus_lr_ratio=ratio,
                    loraplus_lr_embedding=embedding_lr,
                    loraplus_weight_decay=self.args.weight_decay,
                    **kwargs,
                )
            return self.optimizer

    WithLoraPlus.__name__ = base.__name__ + "WithLoraPlus"
    return WithLoraPlus
