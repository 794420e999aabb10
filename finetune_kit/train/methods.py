"""Which weights train: freeze tuning (some hidden layers), full tuning (every weight), and k-bit preparation.

LoRA lives in :mod:`finetune_kit.train.lora`; :func:`prepare` picks between them by
``MethodConfig.finetuning_type`` and returns the module the training loop optimises.
"""

from __future__ import annotations

import re
from typing import Any

from finetune_kit.errors import ConfigError
from finetune_kit.models.adapters import quiet_peft
from finetune_kit.models.quantize import is_quantized
from finetune_kit.train.config import LoraConfig, MethodConfig
from finetune_kit.train.lora import attach_lora

_LAYER = re.compile(r"\.(\d+)\.")


def layer_count(model: Any) -> int:
    """Number of hidden layers (``config.num_hidden_layers`` or its older names)."""
    cfg = model.config
    for name in ("num_hidden_layers", "num_layers", "n_layer"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"cannot tell how many hidden layers {type(model).__name__} has, so freeze tuning cannot pick")


def freeze_plan(model: Any, method: MethodConfig) -> list[str]:
    """The name fragments of the parameters freeze tuning trains (LLaMA-Factory's rule), checked.

    ``freeze_trainable_layers`` n > 0 trains the last n hidden layers, n < 0 the first |n|;
    ``freeze_trainable_modules`` narrows each layer to modules such as ``mlp``; names in
    ``freeze_extra_modules`` outside the hidden layers (``embed_tokens``, ``norm``, ``lm_head``) train too.
    """
    layers = layer_count(model)
    n = method.freeze_trainable_layers
    ids = range(max(0, layers - n), layers) if n > 0 else range(min(-n, layers))
    inside: set[str] = set()
    outside: set[str] = set()
    for name, _ in model.named_parameters():
        found = _LAYER.search(name)
        if found:
            inside.add(name[found.end() :].split(".")[0])
        elif "." in name:
            outside.add(name.split(".")[-2])
    problems = []
    modules = method.freeze_trainable_modules
    unknown = [m for m in modules if m != "all" and m not in inside]
    if unknown:
        problems.append(
            f"freeze_trainable_modules: {unknown} are not modules of a hidden layer of this model. "
            f"Available: {', '.join(sorted(inside))} (or 'all')"
        )
    extra = method.freeze_extra_modules or ()
    unknown_extra = [m for m in extra if m not in outside]
    if unknown_extra:
        problems.append(
            f"freeze_extra_modules: {unknown_extra} are not modules outside the hidden layers. "
            f"Available: {', '.join(sorted(outside))}"
        )
    if problems:
        raise ConfigError(problems)
    fragments = [f".{i}." + ("" if m == "all" else f"{m}.") for i in ids for m in modules]
    return fragments + [f".{m}." for m in extra]


def apply_freeze(model: Any, method: MethodConfig) -> Any:
    """Make only the parameters of :func:`freeze_plan` trainable (in float32); return ``model``."""
    fragments = freeze_plan(model, method)
    for name, p in model.named_parameters():
        train = any(f in f".{name}" for f in fragments)
        p.requires_grad_(train)
        if train:
            _to_float32(p)
    return model


def apply_full(model: Any) -> Any:
    """Make every parameter trainable (in float32, so mixed precision updates full-precision weights)."""
    for p in model.parameters():
        p.requires_grad_(True)
        _to_float32(p)
    return model


def prepare(
    model: Any,
    method: MethodConfig,
    lora: LoraConfig,
    targets: list[str],
    *,
    seed: int,
    gradient_checkpointing: bool,
) -> Any:
    """The module to train for ``method``: LoRA attached, or the model with freeze/full flags set."""
    quantized = is_quantized(model)
    if quantized and method.finetuning_type != "lora":
        raise ConfigError(
            f"finetuning_type: {method.finetuning_type} cannot train quantized weights. Fix: use "
            "finetuning_type: lora with quantization_bit (QLoRA), or drop quantization_bit"
        )
    if quantized:
        from peft import prepare_model_for_kbit_training

        with quiet_peft():
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if method.finetuning_type == "lora":
        return attach_lora(model, lora, targets, seed=seed, gradient_checkpointing=gradient_checkpointing)
    model = apply_freeze(model, method) if method.finetuning_type == "freeze" else apply_full(model)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def trainable_names(model: Any) -> list[str]:
    """Names of the parameters that will be updated."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _to_float32(p: Any) -> None:
    import torch

    if getattr(p, "ds_id", None) is not None:
        return  # partitioned by DeepSpeed ZeRO-3, which keeps its own float32 master copy
    if p.dtype != torch.float32 and p.is_floating_point():
        p.data = p.data.float()
