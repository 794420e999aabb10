"""Merging LoRA adapters into the base weights and writing a self-contained model folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_kit._fs import atomic_dir
from finetune_kit.errors import OutputExistsError

if TYPE_CHECKING:
    from finetune_kit.models.loaded import LoadedModel

EXPORT_MARKER = "finetune_kit_export.json"


@dataclass(frozen=True)
class ExportedModel:
    """A merged model folder: loads with plain ``transformers`` and keeps the chat template.

    Example::

        exported = Exporter(result).merge("merged")
        print(exported.load().chat("你们包邮吗？"))
    """

    export_dir: Path
    template: str | None
    files: tuple[str, ...]

    def __repr__(self) -> str:
        return f"ExportedModel({str(self.export_dir)!r}, template={self.template}, {len(self.files)} files)"

    def load(self, **changes: Any) -> LoadedModel:
        from finetune_kit.models.source import ModelSource

        return ModelSource.local(self.export_dir).load(**({"template": self.template} | changes))


def prepare_target(export_dir: Path, overwrite: bool) -> None:
    """Refuse to replace a folder the user made unless asked; earlier finetune_kit exports may be replaced."""
    if export_dir.exists() and any(export_dir.iterdir()):
        if not (export_dir / EXPORT_MARKER).is_file() and not overwrite:
            raise OutputExistsError(
                f"export_dir {export_dir} already exists, is not empty and is not a finetune_kit export. Fix: choose "
                "a new export_dir, or set overwrite_export_dir: true to replace it")


def write_export(model: LoadedModel, merged: Any, export_dir: Path, *, shard_gb: int, legacy: bool,
                 info: dict[str, Any]) -> ExportedModel:
    """Write weights, tokenizer (with the chat template) and generation config atomically."""
    from finetune_kit.train.trainer import tokenizer_for_saving

    export_dir = export_dir.resolve()
    with atomic_dir(export_dir) as tmp:
        stops = model.stop_token_ids
        merged.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
        merged.generation_config.pad_token_id = model.tokenizer.pad_token_id
        merged.config.eos_token_id = stops[0]
        merged.save_pretrained(tmp, max_shard_size=f"{shard_gb}GB", safe_serialization=not legacy)
        tokenizer = tokenizer_for_saving(model)
        tokenizer.padding_side = "left"
        tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_MARKER).write_text(json.dumps(info, indent=2, ensure_ascii=False, default=str))
    files = tuple(sorted(p.name for p in export_dir.iterdir()))
    return ExportedModel(export_dir, model.template.name if not model.template.is_native else None, files)
