"""Applying LoRA adapters to a loaded base model."""

from __future__ import annotations

from collections.abc import Sequence
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


def apply_adapters(model: Any, adapters: Sequence[str], *, trainable: bool = False) -> Any:
    """Merge all adapters but the last into the weights; keep the last one as a live PeftModel."""
    from peft import PeftModel

    paths = [check_adapter_dir(a) for a in adapters]
    for p in paths[:-1]:
        model = PeftModel.from_pretrained(model, str(p)).merge_and_unload()
    return PeftModel.from_pretrained(model, str(paths[-1]), is_trainable=trainable)
