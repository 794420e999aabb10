"""Every file name finetune_kit writes next to an artifact, and the one provenance record they share.

Writers and readers import the names from here (peft's ``CONFIG_NAME`` habit), so a file is
never written under one spelling and read under another. Each stage that produces something
(a training run, a prediction run, an export, a converted-model cache) writes one JSON record
of the same shape::

    {"finetune_kit_version": "0.1.0", "kind": "train", "created": "2026-11-27T10:00:00+0000",
     "model": "bundled:smollm2-135m-instruct", "adapters": [...], "template": "chatml",
     "datasets": [...], "config": {"model": {...}, "lora": {...}, ...}, ...kind-specific keys}

Reading is forward compatible: a record written by a newer finetune_kit (extra keys, extra
config fields) still loads, with a :class:`FinetuneKitWarning` naming what was ignored.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, TypeVar

from finetune_kit._fs import write_json
from finetune_kit._version import __version__
from finetune_kit.errors import FinetuneKitWarning

# training output_dir
RUN_RECORD = "finetune_kit_config.json"
TRAIN_RESULTS = "train_results.json"
TRAINER_STATE = "trainer_state.json"
TRAINER_LOG = "trainer_log.jsonl"
LOSS_PLOT = "training_{key}.png"
# prediction output_dir
PREDICT_RECORD = "finetune_kit_predict.json"
PREDICTIONS = "generated_predictions.jsonl"
PREDICT_RESULTS = "predict_results.json"
ALL_RESULTS = "all_results.json"
# benchmark save_dir (results.json and results.log are LLaMA-Factory's names)
BENCHMARK_RECORD = "finetune_kit_benchmark.json"
BENCHMARK_RESULTS = "results.json"
BENCHMARK_LOG = "results.log"
# merged export folder
EXPORT_RECORD = "finetune_kit_export.json"
# converted-checkpoint cache folder
CACHE_RECORD = "finetune_kit_source.json"

Kind = Literal["train", "predict", "benchmark", "export", "cache"]
C = TypeVar("C")


def provenance(
    kind: Kind,
    *,
    model: str | None,
    adapters: Sequence[str] = (),
    template: str | None = None,
    datasets: Sequence[str] = (),
    config: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The provenance record of one artifact; ``extra`` adds kind-specific keys (``resolved``, ``source``...)."""
    return {
        "finetune_kit_version": __version__,
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model,
        "adapters": [str(a) for a in adapters],
        "template": template,
        "datasets": list(datasets),
        "config": dict(config or {}),
        **extra,
    }


def write_record(folder: Path, name: str, record: Mapping[str, Any]) -> Path:
    """Write ``record`` as ``folder/name`` atomically; returns the path."""
    path = Path(folder) / name
    write_json(path, dict(record))
    return path


def read_record(path: Path) -> dict[str, Any]:
    """Read a provenance record; warn when a newer finetune_kit wrote it."""
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object")
    written_by = str(record.get("finetune_kit_version", ""))
    if written_by and _newer(written_by, __version__):
        warnings.warn(
            f"{path} was written by finetune_kit {written_by}, newer than this {__version__}; fields this "
            "version does not know are ignored",
            FinetuneKitWarning,
            stacklevel=2,
        )
    return record


def known_fields(cls: type[C], values: Mapping[str, Any], *, where: str, drop: Sequence[str] = ()) -> C:
    """``cls(**values)`` for a config dataclass, keeping only the fields this version has (warning on the rest)."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names - set(drop))
    if unknown:
        warnings.warn(
            f"{where}: ignoring {', '.join(unknown)} (not known to finetune_kit {__version__})",
            FinetuneKitWarning,
            stacklevel=2,
        )
    return cls(**{k: v for k, v in values.items() if k in names and k not in drop})


def saved_template(adapter_dirs: Sequence[str]) -> tuple[str | None, str | None]:
    """The template name and default system prompt the last of ``adapter_dirs`` was trained with, if recorded."""
    for folder in reversed(adapter_dirs):
        path = Path(folder) / RUN_RECORD
        if path.is_file():
            model_cfg = read_record(path).get("config", {}).get("model", {})
            return model_cfg.get("template"), model_cfg.get("default_system")
    return None, None


def _newer(a: str, b: str) -> bool:
    def key(v: str) -> tuple[int, ...]:
        return tuple(int(p) if p.isdigit() else 0 for p in v.split("+")[0].split("."))

    return key(a) > key(b)
