"""LoRA adapters on a loaded model: applied at load time, or added in memory without touching the base.

In-memory work never changes the model it starts from. :func:`shared_clone` makes a new module
tree whose parameters are the *same tensors* as the original's (no copy of the weights), so
peft can inject its layers into the clone while the original keeps its own modules, weights
and outputs. Only what will be written to (a merge, a continued adapter) is copied.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from finetune_kit.errors import ModelNotFoundError


def check_adapter_dir(path: str) -> Path:
    p = Path(path).expanduser()
    if not (p / "adapter_config.json").is_file():
        raise ModelNotFoundError(
            f"{p} is not a LoRA adapter folder (no adapter_config.json). Fix: point adapter_name_or_path at the "
            "output_dir of a finished training run (or one of its checkpoint-* folders)"
        )
    return p


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Silence one FutureWarning peft triggers on every wrap (it reads transformers' deprecated
    ``is_gradient_checkpointing``); nothing for the user to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


@contextmanager
def quiet_checkpointing() -> Iterator[None]:
    """Silence transformers' FutureWarnings about its renamed gradient-checkpointing methods, which TRL
    still calls at every preference step (nothing a user can act on)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r".*`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated.*",
            category=FutureWarning,
        )
        yield


def apply_adapters(model: Any, adapters: Sequence[str], *, trainable: bool = False, merge_all: bool = False) -> Any:
    """Merge all adapters but the last into the weights; keep the last one as a live PeftModel.

    Used on a freshly loaded model that nothing else holds (LLaMA-Factory's rule for
    ``adapter_name_or_path: a,b``: a is merged, b is trained further or served unmerged).
    ``merge_all`` merges the last one too (``create_new_adapter``: a fresh adapter goes on top).
    """
    from peft import PeftModel

    paths = [check_adapter_dir(a) for a in adapters]
    with quiet_peft():
        for p in paths[:-1] if not merge_all else paths:
            model = PeftModel.from_pretrained(model, str(p)).merge_and_unload()
        if merge_all:
            return model
        return PeftModel.from_pretrained(model, str(paths[-1]), is_trainable=trainable)


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def unwrapped(model: Any) -> Any:
    """The model inside a PEFT wrapper (``model`` itself when it has none)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def shared_clone(model: Any, *, copy_if: Callable[[str], bool] = lambda name: False) -> Any:
    """A deep copy of ``model``'s modules that shares every parameter and buffer except those ``copy_if`` picks."""
    memo: dict[int, Any] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if not copy_if(name):
            memo[id(tensor)] = tensor
    return copy.deepcopy(model, memo)


def merged_clone(model: Any) -> Any:
    """A plain transformers model with every active adapter of ``model`` merged, leaving ``model`` unchanged.

    Only the layers an adapter wraps are copied (then merged by peft); the rest is shared.
    """
    if not is_peft(model):
        return shared_clone(model)
    clone = shared_clone(model, copy_if=lambda name: ".base_layer." in name)
    return clone.merge_and_unload()


def add_adapter(model: Any, folder: str) -> Any:
    """``model`` with the adapter at ``folder`` applied (unmerged), as a new module tree sharing its weights."""
    from peft import PeftModel

    path = check_adapter_dir(folder)
    base = merged_clone(model) if is_peft(model) else shared_clone(model)
    with quiet_peft(), kept_requires_grad(model):
        return PeftModel.from_pretrained(base, str(path))


@contextmanager
def kept_requires_grad(model: Any) -> Iterator[None]:
    """Restore every parameter's ``requires_grad`` afterwards: peft freezes the tensors it wraps, and a
    shared clone's tensors are the original model's."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


def add_named_adapters(model: Any, adapters: Mapping[str, str]) -> Any:
    """``model`` with every adapter of ``adapters`` (name -> folder) loaded side by side, unmerged,
    as a new module tree sharing its weights; the first one is active."""
    from peft import PeftModel

    if not adapters:
        raise ValueError("with_named_adapters needs at least one adapter: {name: folder}")
    for name in adapters:
        if not ADAPTER_NAME.fullmatch(name) or name == "__base__":
            raise ValueError(
                f"adapter name {name!r} cannot be used as a model id. Fix: use letters, digits and . _ : - "
                "(up to 64, starting with a letter or digit), e.g. shop or sql-v2"
            )
    paths = {name: check_adapter_dir(folder) for name, folder in adapters.items()}
    base = merged_clone(model) if is_peft(model) else shared_clone(model)
    first, *rest = paths.items()
    with quiet_peft(), kept_requires_grad(model):
        multi = PeftModel.from_pretrained(base, str(first[1]), adapter_name=first[0])
        for name, path in rest:
            multi.load_adapter(str(path), adapter_name=name)
    multi.set_adapter(first[0])
    multi.eval()
    return multi


def split_named_adapters(entries: Sequence[str]) -> tuple[tuple[str, ...], dict[str, str]]:
    """``adapter_name_or_path`` entries split into the chain applied in order (plain folders) and the
    named ones (``name=folder``) a server loads side by side. An entry whose text is an existing
    folder is always a folder, even if it contains ``=``."""
    chain: list[str] = []
    named: dict[str, str] = {}
    for entry in entries:
        name, sep, folder = entry.partition("=")
        if not sep or Path(entry).expanduser().is_dir():
            chain.append(entry)
        elif name.strip() in named:
            raise ValueError(f"adapter name {name.strip()!r} is given twice in adapter_name_or_path; names must differ")
        else:
            named[name.strip()] = folder.strip()
    return tuple(chain), named
