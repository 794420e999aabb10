"""ExportedModel: a merged, self-contained model folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_kit.models.source import ModelSource

if TYPE_CHECKING:
    from finetune_kit.export.gguf import GgufFile
    from finetune_kit.export.parity import ParityReport
    from finetune_kit.models.loaded import LoadedModel


@dataclass(frozen=True)
class GgufExport:
    """GGUF files written for llama.cpp and Ollama, with their parity reports and the Modelfile.

    ``parity`` is empty when the check was turned off; ``ollama`` is the name ``ollama create``
    registered (None when it was not asked for or no ``ollama`` binary was found). Example::

        gguf = Exporter(result).to_gguf("gguf/shop", ["f16", "q4_K_M"])
        for report in gguf.parity:
            print(report.summary())
    """

    folder: Path
    files: tuple[GgufFile, ...]
    parity: tuple[ParityReport, ...]
    modelfile: Path | None
    ollama: str | None = None

    def __repr__(self) -> str:
        names = ", ".join(f.path.name for f in self.files)
        return f"GgufExport({str(self.folder)!r}, [{names}])"

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(f.path for f in self.files)


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
    gguf: GgufExport | None = None  # GGUF files written beside the weights (export_gguf)
    hub_url: str | None = None  # where export_hub_model_id pushed it

    def __repr__(self) -> str:
        return f"ExportedModel({str(self.export_dir)!r}, template={self.template_name}, {len(self.files)} files)"

    @property
    def source(self) -> ModelSource:
        """The folder as a model source (with its template), for ``load`` or a trainer."""
        return ModelSource.local(self.export_dir).with_config(template=self.template_name)

    def load(self, **changes: Any) -> LoadedModel:
        """Load the merged model from its folder; ``changes`` are ModelConfig fields."""
        return self.source.load(**changes)
