"""ExportedModel: a merged, self-contained model folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_kit.models.source import ModelSource

if TYPE_CHECKING:
    from finetune_kit.models.loaded import LoadedModel


@dataclass(frozen=True)
class ExportedModel:
    """A merged model folder: loads with plain ``transformers`` and keeps the chat template.

    ``template_name`` is the finetune_kit template it was trained with (None when the
    tokenizer's own template was used). Example::

        exported = Exporter(result).merge("merged")
        print(exported.load().chat("你们包邮吗？"))
    """

    export_dir: Path
    template_name: str | None
    files: tuple[str, ...]

    def __repr__(self) -> str:
        return f"ExportedModel({str(self.export_dir)!r}, template={self.template_name}, {len(self.files)} files)"

    @property
    def source(self) -> ModelSource:
        """The folder as a model source (with its template), for ``load`` or a trainer."""
        return ModelSource.local(self.export_dir).with_config(template=self.template_name)

    def load(self, **changes: Any) -> LoadedModel:
        """Load the merged model from its folder; ``changes`` are ModelConfig fields."""
        return self.source.load(**changes)
