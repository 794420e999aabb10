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

    def __repr__(self) -> str:
        loss = self.metrics.get("train_loss")
        loss_txt = f", train_loss={loss:.4f}" if isinstance(loss, (int, float)) else ""
        where = "in memory" if self.model is not None else "on disk"
        return f"TrainResult({str(self.output_dir)!r}, base={self.base.display_name}{loss_txt}, {where})"

    @property
    def adapter_dir(self) -> Path:
        return self.output_dir

    @property
    def adapters(self) -> tuple[str, ...]:
        """Every adapter of the trained model, in order: the base's, then this run's."""
        return (*(self.base.config.adapter_name_or_path or ()), str(self.output_dir))

    @property
    def losses(self) -> list[tuple[int, float]]:
        """``(step, loss)`` for every logged training step."""
        return [(e["step"], e["loss"]) for e in self.log_history if "loss" in e and "step" in e]

    def load(self, **changes: Any) -> LoadedModel:
        """The trained model: the in-memory one when there is one and no ``changes`` are asked, else
        the base loaded from disk with the adapters applied (``changes`` are ModelConfig fields)."""
        if self.model is not None and not changes:
            return self.model
        return self.base.load(adapter_name_or_path=self.adapters, **changes)

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
        return cls(out, base, metrics, history, tuple(sorted(out.glob(LOSS_PLOT.format(key="*")))))
