"""TrainResult: what a finished LoRA run produced, and the way to load it back."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finetune_kit.models.loaded import LoadedModel
    from finetune_kit.models.source import ModelSource


@dataclass(frozen=True)
class TrainResult:
    """A finished run: the adapter folder, its metrics and loss history.

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

    def __repr__(self) -> str:
        loss = self.metrics.get("train_loss")
        loss_txt = f", train_loss={loss:.4f}" if isinstance(loss, (int, float)) else ""
        return f"TrainResult({str(self.output_dir)!r}, base={self.base.display_name}{loss_txt})"

    @property
    def adapter_dir(self) -> Path:
        return self.output_dir

    @property
    def losses(self) -> list[tuple[int, float]]:
        """``(step, loss)`` for every logged training step."""
        return [(e["step"], e["loss"]) for e in self.log_history if "loss" in e and "step" in e]

    def load(self, **changes: Any) -> LoadedModel:
        """Load the base model with this run's adapter applied (unmerged); ``changes`` are ModelConfig fields."""
        adapters = (*(self.base.config.adapter_name_or_path or ()), str(self.output_dir))
        return self.base.load(adapter_name_or_path=adapters, **changes)

    @classmethod
    def from_dir(cls, output_dir: str | Path) -> TrainResult:
        """Re-open a finished run from its output folder (reads finetune_kit_config.json)."""
        from finetune_kit.models.config import ModelConfig
        from finetune_kit.models.loaded import RUN_CONFIG
        from finetune_kit.models.source import ModelSource

        out = Path(output_dir)
        saved = json.loads((out / RUN_CONFIG).read_text())
        model_cfg = {k: v for k, v in saved["config"]["model"].items() if k not in ("adapter_name_or_path", "hf_hub_token")}
        base = ModelSource.from_config(ModelConfig(**model_cfg))
        state = out / "trainer_state.json"
        history = tuple(json.loads(state.read_text()).get("log_history", [])) if state.is_file() else ()
        metrics_file = out / "train_results.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        return cls(out, base, metrics, history, tuple(sorted(out.glob("training_*.png"))))
