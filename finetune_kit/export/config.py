"""Export settings (LLaMA-Factory's export arguments)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from finetune_kit.config.base import StageConfig, option


@dataclass(frozen=True, repr=False)
class ExportConfig(StageConfig):
    """Where and how a merged model is written."""

    section = "export"

    export_dir: str | None = option(None, "Folder for the merged model (required).")
    export_size: int = option(5, "Largest shard size in GB.")
    export_device: Literal["cpu", "auto"] = option("cpu", "Merge on the CPU, or on the GPU when one exists (auto).")
    export_legacy_format: bool = option(False, "Write pytorch_model*.bin instead of safetensors.")
    overwrite_export_dir: bool = option(False, "Replace a non-empty export_dir that is not a finetune_kit export.")

    def _check(self) -> list[str]:
        if self.export_size < 1:
            return [f"export_size: got {self.export_size}; expected a positive number of GB"]
        return []
