"""The module tree a trainer trains, and how the caller's model is given back unchanged.

A :class:`ModelSource` is loaded here for training (the trainer owns it). A caller's
:class:`LoadedModel` is never changed: training runs on a copy of its module tree that shares
every weight the method leaves untouched, and copies the ones it writes (a continued adapter,
the layers PiSSA rewrites, the layers freeze tuning trains, every weight for full tuning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune_kit.models.adapters import is_peft, merged_clone, shared_clone
from finetune_kit.models.loaded import LoadedModel
from finetune_kit.models.loader import LoadPlan, load_model
from finetune_kit.models.source import ModelSource
from finetune_kit.train.config import LoraConfig, MethodConfig
from finetune_kit.train.lora import changes_base_weights
from finetune_kit.train.methods import freeze_plan

if TYPE_CHECKING:
    from collections.abc import Callable

    from finetune_kit.data.template import ChatTemplate


@dataclass
class Held:
    """What the trainer trains (``module``), the model it came from, and the flags to restore."""

    loaded: LoadedModel
    module: Any
    base_source: ModelSource
    grad_flags: list[tuple[Any, bool]]

    @property
    def template(self) -> ChatTemplate:
        return self.loaded.template

    @classmethod
    def take(
        cls,
        model: LoadedModel | ModelSource,
        plan: LoadPlan | None,
        method: MethodConfig,
        lora: LoraConfig,
        targets: Callable[[Any], list[str]],
    ) -> Held:
        """Load ``model`` (a source) or make the training copy of it (a loaded model); ``targets`` gives the
        module names LoRA will wrap in a module tree."""
        if isinstance(model, ModelSource):
            assert plan is not None
            loaded = load_model(model, plan)
            return cls(loaded, loaded.model, _base_of(loaded, merged=plan.merge_all_adapters), [])
        flags = [(p, p.requires_grad) for p in model.model.parameters()]
        fresh = method.finetuning_type != "lora" or lora.create_new_adapter
        if fresh and is_peft(model.model):  # every adapter merged into a copy of the touched layers
            return cls(model, merged_clone(model.model), _base_of(model, merged=True), flags)
        module = shared_clone(model.model, copy_if=_written(model.model, method, lora, targets))
        return cls(model, module, _base_of(model, merged=False), flags)

    def restore(self) -> None:
        for p, flag in self.grad_flags:
            p.requires_grad_(flag)


def _written(
    module: Any, method: MethodConfig, lora: LoraConfig, targets: Callable[[Any], list[str]]
) -> Callable[[str], bool]:
    """Which parameter names training writes to, so the copy gets its own tensors for them."""
    if method.finetuning_type == "full":
        return lambda name: True
    if method.finetuning_type == "freeze":
        fragments = freeze_plan(module, method)
        return lambda name: any(f in f".{name}" for f in fragments)
    if is_peft(module):
        return lambda name: "lora_" in name or (changes_base_weights(lora) and ".base_layer." in name)
    if changes_base_weights(lora):  # PiSSA rewrites the weights of the layers it wraps
        wrapped = [f".{t}." for t in targets(module)]
        return lambda name: any(w in f".{name}" for w in wrapped)
    return lambda name: False


def _base_of(loaded: LoadedModel, *, merged: bool) -> ModelSource:
    """The source of the model the trained weights apply to: a continued (last) adapter is replaced.

    With ``merged`` every adapter was merged in and stays part of the base.
    """
    kept = loaded.adapters if merged else loaded.adapters[:-1]
    return loaded.source.with_config(adapter_name_or_path=kept or None)
