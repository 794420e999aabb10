"""The handlers behind each ``finetune-kit`` command."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune_kit.config.base import StageConfig
from finetune_kit.config.parse import build, collect, describe
from finetune_kit.config.run import RunConfig
from finetune_kit.data.config import DataConfig
from finetune_kit.export.config import ExportConfig
from finetune_kit.models.config import ModelConfig
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.train.config import LoraConfig, TrainingConfig


def _parse(argv: Sequence[str], sections: list[type[StageConfig]], usage: str) -> dict[Any, Any] | None:
    if "-h" in argv or "--help" in argv:
        print(usage + describe(sections))
        return None
    return build(collect(argv), sections)


def env(argv: Sequence[str]) -> int:
    from finetune_kit.environment import Environment

    print(Environment.detect().report())
    return 0


def version(argv: Sequence[str]) -> int:
    from finetune_kit import __version__

    print(__version__)
    return 0


def train(argv: Sequence[str]) -> int:
    from finetune_kit.evaluate.config import PredictConfig

    sections = [RunConfig, ModelConfig, DataConfig, LoraConfig, TrainingConfig, GenerationConfig, PredictConfig]
    cfg = _parse(argv, sections, "usage: finetune-kit train config.yaml [key=value ...] [--key value ...]\n")
    if cfg is None:
        return 0
    from finetune_kit.cli.workflows import run_train

    run_train(cfg[RunConfig], cfg[ModelConfig], cfg[DataConfig], cfg[LoraConfig], cfg[TrainingConfig],
              cfg[GenerationConfig], cfg[PredictConfig])
    return 0


def evaluate(argv: Sequence[str]) -> int:
    from finetune_kit.evaluate.config import PredictConfig

    sections = [ModelConfig, LoraConfig, DataConfig, GenerationConfig, PredictConfig]
    cfg = _parse(argv, sections, "usage: finetune-kit eval config.yaml eval_dataset=NAME output_dir=DIR ...\n"
                                 "Generates on eval_dataset and scores ROUGE/BLEU (LLaMA-Factory's do_predict).\n")
    if cfg is None:
        return 0
    from finetune_kit.cli.workflows import run_predict

    run_predict(cfg[ModelConfig], cfg[DataConfig], cfg[GenerationConfig], cfg[PredictConfig])
    return 0


def export(argv: Sequence[str]) -> int:
    cfg = _parse(argv, [ModelConfig, LoraConfig, ExportConfig],
                 "usage: finetune-kit export --model_name_or_path M --adapter_name_or_path A --export_dir D\n")
    if cfg is None:
        return 0
    from finetune_kit.export.exporter import Exporter
    from finetune_kit.models.source import ModelSource

    exported = Exporter(ModelSource.from_config(cfg[ModelConfig]), cfg[ExportConfig]).merge()
    print(f"Merged model written to {exported.export_dir} ({', '.join(exported.files)})")
    return 0


def api(argv: Sequence[str]) -> int:
    from finetune_kit.serve.config import ServeConfig

    cfg = _parse(argv, [ModelConfig, LoraConfig, GenerationConfig, ServeConfig],
                 "usage: [API_PORT=8000] finetune-kit api --model_name_or_path M [--adapter_name_or_path A]\n")
    if cfg is None:
        return 0
    from finetune_kit.models.source import ModelSource
    from finetune_kit.serve.server import Server

    model = ModelSource.from_config(cfg[ModelConfig]).load()
    Server(model, config=cfg[ServeConfig], generation=cfg[GenerationConfig]).run()
    return 0


def chat(argv: Sequence[str]) -> int:
    cfg = _parse(argv, [ModelConfig, LoraConfig, GenerationConfig],
                 "usage: finetune-kit chat --model_name_or_path M [--adapter_name_or_path A] [--template T]\n")
    if cfg is None:
        return 0
    from finetune_kit.cli.workflows import run_chat

    run_chat(cfg[ModelConfig], cfg[GenerationConfig])
    return 0


def quickstart(argv: Sequence[str]) -> int:
    from finetune_kit.quickstart import QuickstartConfig, run_quickstart

    cfg = _parse(argv, [QuickstartConfig], "usage: finetune-kit quickstart [--output_dir DIR] [--num_train_epochs N]\n")
    if cfg is None:
        return 0
    run_quickstart(cfg[QuickstartConfig])
    return 0


def data(argv: Sequence[str]) -> int:
    if not argv or argv[0] != "check":
        print("usage: finetune-kit data check DATASET_DIR [--dataset a,b]")
        return 2
    rest = list(argv[1:])
    if rest and not rest[0].startswith("-") and "=" not in rest[0] and Path(rest[0]).is_dir():
        rest = [f"dataset_dir={rest[0]}", *rest[1:]]
    cfg = _parse(rest, [DataConfig], "usage: finetune-kit data check DATASET_DIR [--dataset a,b]\n")
    if cfg is None:
        return 0
    from finetune_kit.cli.workflows import run_data_check

    return run_data_check(cfg[DataConfig])
