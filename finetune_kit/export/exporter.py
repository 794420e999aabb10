"""Exporter: merge a trained adapter into its base model and save it for transformers, vLLM or llama.cpp."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_kit.errors import ConfigError
from finetune_kit.export.config import ExportConfig
from finetune_kit.export.merge import ExportedModel, prepare_target, write_export

if TYPE_CHECKING:
    from finetune_kit.models.loaded import LoadedModel
    from finetune_kit.models.source import ModelSource
    from finetune_kit.train.result import TrainResult


@dataclass(frozen=True)
class Exporter:
    """Merge LoRA weights into the base and write sharded safetensors with tokenizer and chat template.

    Takes a :class:`TrainResult`, or a :class:`ModelSource` whose config names adapters.
    Example::

        exported = Exporter(result).with_config(export_size=2).merge("merged-model")
    """

    source: TrainResult | ModelSource
    config: ExportConfig = ExportConfig()

    def __repr__(self) -> str:
        return f"Exporter({self.source!r}, export_size={self.config.export_size}GB)"

    def with_config(self, **changes: Any) -> Exporter:
        return replace(self, config=self.config.with_(**changes))

    def _load(self) -> LoadedModel:
        import torch

        from finetune_kit.train.result import TrainResult

        device = "cuda" if self.config.export_device == "auto" and torch.cuda.is_available() else "cpu"
        if isinstance(self.source, TrainResult):
            return self.source.load(device=device)
        return self.source.load(device=device)

    def merge(self, export_dir: str | Path | None = None) -> ExportedModel:
        """Merge and write to ``export_dir`` (or the config's); returns the :class:`ExportedModel`.

        The folder is written under a temporary name and renamed at the end: an interrupted
        export leaves nothing half-written, and an existing folder is kept until the new one is complete.
        """
        from finetune_kit import __version__

        target = export_dir if export_dir is not None else self.config.export_dir
        if not target:
            raise ConfigError("export_dir is required. Fix: pass export_dir='merged-model' (or --export_dir)")
        target = Path(target)
        prepare_target(target, self.config.overwrite_export_dir)
        model = self._load()
        merged = model.model.merge_and_unload() if hasattr(model.model, "merge_and_unload") else model.model
        merged = merged.to("cpu")
        info = {"finetune_kit_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "base_model": model.source.display_name, "adapters": list(model.adapters),
                "template": model.template.name, "config": self.config.with_(export_dir=str(target)).to_dict(),
                "model_config": model.source.config.to_saved_dict()}
        return write_export(model, merged, target, shard_gb=self.config.export_size,
                            legacy=self.config.export_legacy_format, info=info)
