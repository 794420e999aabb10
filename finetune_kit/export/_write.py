"""Writing a merged model as a self-contained folder: weights, tokenizer with template, stops, provenance."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_kit._artifacts import EXPORT_RECORD, write_record
from finetune_kit._fs import atomic_dir
from finetune_kit.errors import OutputExistsError
from finetune_kit.export.card import MODEL_CARD, model_card
from finetune_kit.export.result import ExportedModel

if TYPE_CHECKING:
    from finetune_kit.models.loaded import LoadedModel


def prepare_target(export_dir: Path, overwrite: bool) -> None:
    """Refuse to replace a folder the user made unless asked; earlier finetune_kit exports may be replaced."""
    if export_dir.exists() and any(export_dir.iterdir()):
        if not (export_dir / EXPORT_RECORD).is_file() and not overwrite:
            raise OutputExistsError(
                f"export_dir {export_dir} already exists, is not empty and is not a finetune_kit export. Fix: choose "
                "a new export_dir, or set overwrite_export_dir: true to replace it"
            )


def write_export(
    model: LoadedModel,
    merged: Any,
    export_dir: Path,
    *,
    shard_gb: int,
    legacy: bool,
    info: dict[str, Any],
    metrics: Mapping[str, Any] | None = None,
) -> ExportedModel:
    """Write weights, tokenizer (with the chat template), generation config and model card atomically.

    ``merged`` is the plain transformers model to save (its configs get the template's stop ids);
    ``metrics`` are the final training metrics for the card (else read from the last adapter's folder).
    """
    export_dir = export_dir.resolve()
    with atomic_dir(export_dir) as tmp:
        stops = model.stop_token_ids
        merged.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
        merged.generation_config.pad_token_id = model.tokenizer.pad_token_id
        merged.config.eos_token_id = stops[0]
        merged.save_pretrained(tmp, max_shard_size=f"{shard_gb}GB", safe_serialization=not legacy)
        tokenizer = model.tokenizer_with_template()
        tokenizer.padding_side = "left"
        tokenizer.save_pretrained(tmp)
        write_record(tmp, EXPORT_RECORD, info)
        (tmp / MODEL_CARD).write_text(model_card(info, metrics=metrics), encoding="utf-8")
    files = tuple(sorted(p.name for p in export_dir.iterdir()))
    return ExportedModel(export_dir, model.template.name if not model.template.is_native else None, files)
