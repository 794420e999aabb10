"""TrainResult: what a finished run produced, with the trained model still in memory."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_kit._artifacts import LOSS_PLOT, RUN_RECORD, TRAIN_RESULTS, TRAINER_STATE, known_fields, read_record
from finetune_kit.models.config import ModelConfig
from finetune_kit.models.source import ModelSource

if TYPE_CHECKING:
    from finetune_kit.models.loaded import LoadedModel


@dataclass(frozen=True)
class TrainResult:
    """A finished run: the adapter folder, its metrics and loss history, and the trained model.

    ``base`` is the model the adapter applies to (with any adapters merged under it). After
    ``train()``, ``load()`` hands over the trained model that is still in memory (sharing the
    base weights, nothing reloaded); a result re-opened with :meth:`from_dir` loads from disk.
    Example::

        result = trainer.train(data)
        tuned = result.load()          # base model + trained adapter
        print(result.metrics["train_loss"], result.plots)
    """

    output_dir: Path
    base: ModelSource = field(repr=False)
    metrics: dict[str, float] = field(default_factory=dict)
    log_history: tuple[dict[str, Any], ...] = field(default=(), repr=False)
    plots: tuple[Path, ...] = ()
    model: LoadedModel | None = field(default=None, repr=False, compare=False)
    finetuning_type: str = "lora"

    def __repr__(self) -> str:
        loss = self.metrics.get("train_loss")
        loss_txt = f", train_loss={loss:.4f}" if isinstance(loss, (int, float)) else ""
        where = "in memory" if self.model is not None else "on disk"
        return f"TrainResult({str(self.output_dir)!r}, base={self.base.display_name}{loss_txt}, {where})"

    @property
    def adapter_dir(self) -> Path:
        return self.output_dir

    @property
    def is_adapter(self) -> bool:
        """True when ``output_dir`` holds a LoRA adapter; False when it holds a whole model (freeze/full)."""
        return self.finetuning_type == "lora"

    @property
    def adapters(self) -> tuple[str, ...]:
        """Every adapter of the trained model, in order: the base's, then this run's (none for freeze/full)."""
        if not self.is_adapter:
            return ()
        return (*(self.base.config.adapter_name_or_path or ()), str(self.output_dir))

    @property
    def trained_source(self) -> ModelSource:
        """Where the trained model loads from: the base with the adapters, or the saved whole model."""
        if self.is_adapter:
            return self.base.with_config(adapter_name_or_path=self.adapters)
        keep = {k: getattr(self.base.config, k) for k in ("template", "default_system", "tool_format")}
        return ModelSource.local(self.output_dir).with_config(**{k: v for k, v in keep.items() if v is not None})

    @property
    def losses(self) -> list[tuple[int, float]]:
        """``(step, loss)`` for every logged training step."""
        return [(e["step"], e["loss"]) for e in self.log_history if "loss" in e and "step" in e]

    def load(self, **changes: Any) -> LoadedModel:
        """The trained model: the in-memory one when there is one and no ``changes`` are asked, else
        the base loaded from disk with the adapters applied (``changes`` are ModelConfig fields)."""
        if self.model is not None and not changes:
            return self.model
        return self.trained_source.load(**changes)

    @classmethod
    def from_dir(cls, output_dir: str | Path) -> TrainResult:
        """Re-open a finished run from its output folder (reads its provenance record)."""
        out = Path(output_dir)
        record = read_record(out / RUN_RECORD)
        saved = dict(record.get("config", {}).get("model", {}))
        adapters = record.get("adapters") or []
        saved["adapter_name_or_path"] = tuple(adapters[:-1]) or None
        base = ModelSource.from_config(
            known_fields(ModelConfig, saved, where=str(out / RUN_RECORD), drop=("hf_hub_token",))
        )
        state = out / TRAINER_STATE
        history = tuple(json.loads(state.read_text()).get("log_history", [])) if state.is_file() else ()
        metrics_file = out / TRAIN_RESULTS
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        kind = str(record.get("config", {}).get("method", {}).get("finetuning_type", "lora"))
        if kind != "lora":
            base = base.with_config(template=base.config.template or record.get("template"))
        plots = tuple(sorted(out.glob(LOSS_PLOT.format(key="*"))))
        return cls(out, base, metrics, history, plots, finetuning_type=kind)
