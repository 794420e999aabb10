"""The LoRA method: which layers get adapters, attaching them with peft, and counting what is trained."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_kit.errors import ConfigError
from finetune_kit.models.adapters import check_adapter_dir, is_peft, quiet_peft
from finetune_kit.train.config import LoraConfig

_HEADS = {"lm_head", "output_layer", "output", "embed_out", "score"}


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of every linear layer except the output head (LLaMA-Factory's ``lora_target: all``).

    A layer an adapter already wraps counts under its own name (not peft's ``base_layer``).
    """
    import torch

    names = set()
    for full, module in model.named_modules():
        leaf = full.split(".")[-1]
        wrapped = isinstance(getattr(module, "base_layer", None), torch.nn.Linear)
        linear = isinstance(module, torch.nn.Linear) and leaf != "base_layer"
        if (linear or wrapped) and leaf not in _HEADS and "lora_" not in full:
            names.add(leaf)
    return sorted(names)


def resolve_targets(model: Any, lora: LoraConfig, *, continue_adapter: bool = True) -> list[str]:
    """The module names LoRA will wrap: every linear layer for ``all``, else the named ones (checked).

    A model that already carries an adapter keeps that adapter's targets when it is trained
    further (``continue_adapter``); with ``create_new_adapter`` a fresh adapter gets its own.
    """
    if is_peft(model) and continue_adapter:
        return sorted(model.peft_config[model.active_adapter].target_modules)
    available = linear_module_names(model)
    if lora.lora_target == ("all",):
        return available
    missing = [t for t in lora.lora_target if t not in available]
    if missing:
        raise ConfigError(
            f"lora_target names {missing} match no linear layer of this model. Available: "
            f"{', '.join(available)} (or 'all')"
        )
    return list(lora.lora_target)


def saved_adapter(folder: str) -> tuple[list[str], int, bool] | None:
    """``(target modules, rank, DoRA)`` of a saved LoRA adapter folder (None when it names its targets
    by a regular expression)."""
    config = json.loads((check_adapter_dir(folder) / "adapter_config.json").read_text(encoding="utf-8"))
    targets = config.get("target_modules")
    if not isinstance(targets, list):
        return None
    return sorted(targets), int(config.get("r", 8)), bool(config.get("use_dora", False))


def count_lora_params(model: Any, targets: list[str], rank: int, *, dora: bool = False) -> int:
    """Parameters LoRA adds: ``r * (in + out)`` for each targeted linear layer, plus ``out`` per layer for
    DoRA's magnitudes (or the loaded adapter's size)."""
    import torch

    if is_peft(model):
        return sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    return sum(
        rank * (m.in_features + m.out_features) + (m.out_features if dora else 0)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets and "lora_" not in name
    )


def pissa_init_name(lora: LoraConfig) -> str:
    """peft's ``init_lora_weights`` value for PiSSA: exact SVD, or fast SVD with ``pissa_iter`` iterations."""
    return "pissa" if lora.pissa_iter == -1 else f"pissa_niter_{lora.pissa_iter}"


def changes_base_weights(lora: LoraConfig) -> bool:
    """True when attaching LoRA rewrites the wrapped base weights (PiSSA keeps the residual there)."""
    return lora.pissa_init


def attach_lora(model: Any, lora: LoraConfig, targets: list[str], *, seed: int, gradient_checkpointing: bool) -> Any:
    """Wrap ``model`` with fresh LoRA layers, or make its (already loaded) adapter trainable.

    ``model`` must be the trainer's own: peft injects layers into it (and PiSSA rewrites the
    wrapped weights). Trainable weights are kept in float32 so bf16/fp16 autocast updates them
    in full precision. DoRA, rsLoRA, PiSSA and ``additional_target`` are peft's own.
    """
    import peft
    import torch
    from transformers import set_seed

    set_seed(seed)
    if is_peft(model):
        for name, p in model.named_parameters():
            p.requires_grad = "lora_" in name
        peft_model = model
    else:
        cfg = peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=lora.lora_rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.lora_dropout,
            target_modules=targets,
            use_rslora=lora.use_rslora,
            use_dora=lora.use_dora,
            init_lora_weights=pissa_init_name(lora) if lora.pissa_init else True,  # type: ignore[arg-type]
            modules_to_save=list(lora.additional_target) if lora.additional_target else None,
        )
        with quiet_peft():
            peft_model = peft.get_peft_model(model, cfg)
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if gradient_checkpointing:
        peft_model.enable_input_require_grads()
    return peft_model


PISSA_INIT = "pissa_init"


def save_adapter(model: Any, lora: LoraConfig, out: Path) -> Callable[[Any, Path], None]:
    """For a PiSSA adapter: keep its initial state in ``out/pissa_init`` now, and return the final save.

    With ``pissa_convert`` (the default) the final save converts the adapter into a plain LoRA of
    rank 2r that applies to the original base (peft's conversion), so the folder loads like any
    adapter; without it the raw PiSSA adapter is saved, which only fits the residual base.
    """
    init = out / PISSA_INIT
    config = model.peft_config[model.active_adapter]
    config.init_lora_weights, kept = True, config.init_lora_weights
    try:
        model.save_pretrained(init)
    finally:
        config.init_lora_weights = kept

    def save(trained: Any, folder: Path) -> None:
        if lora.pissa_convert:
            trained.save_pretrained(folder, path_initial_model_for_weight_conversion=str(init))
            shutil.rmtree(init, ignore_errors=True)
        else:
            trained.save_pretrained(folder)

    return save
