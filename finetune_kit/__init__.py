"""finetune_kit: LLM fine-tuning as a typed, fluent Python library with a LLaMA-Factory-compatible CLI.

The chain::

    from finetune_kit import Environment, ModelSource, DatasetRegistry, LoraTrainer, Evaluator, Exporter, Server

    model = ModelSource.bundled().load()                      # LoadedModel
    data = DatasetRegistry.demo().load("shop_alpaca")         # Conversations
    result = LoraTrainer(model).with_training(output_dir="saves/shop").train(data)   # TrainResult
    report = Evaluator(result).predict(DatasetRegistry.demo().load("shop_test"))    # EvalReport
    exported = Exporter(result).merge("merged")               # ExportedModel
    Server(exported).run()                                     # OpenAI-compatible API

Importing this package is cheap: torch, transformers and fastapi load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Environment": "finetune_kit.environment",
    "ModelSource": "finetune_kit.models.source",
    "LoadedModel": "finetune_kit.models.loaded",
    "ModelConfig": "finetune_kit.models.config",
    "GenerationConfig": "finetune_kit.models.generation",
    "DatasetRegistry": "finetune_kit.data.registry",
    "Conversations": "finetune_kit.data.conversations",
    "DataConfig": "finetune_kit.data.config",
    "LoraTrainer": "finetune_kit.train.trainer",
    "LoraConfig": "finetune_kit.train.config",
    "TrainingConfig": "finetune_kit.train.config",
    "TrainResult": "finetune_kit.train.result",
    "Evaluator": "finetune_kit.evaluate.evaluator",
    "EvalReport": "finetune_kit.evaluate.evaluator",
    "Exporter": "finetune_kit.export.exporter",
    "ExportConfig": "finetune_kit.export.config",
    "ExportedModel": "finetune_kit.export.merge",
    "Server": "finetune_kit.serve.server",
    "ServeConfig": "finetune_kit.serve.config",
    "FinetuneKitError": "finetune_kit.errors",
    "ConfigError": "finetune_kit.errors",
    "DatasetError": "finetune_kit.errors",
    "DatasetRowError": "finetune_kit.errors",
    "ModelNotFoundError": "finetune_kit.errors",
    "EnvironmentCheckError": "finetune_kit.errors",
    "MissingDependencyError": "finetune_kit.errors",
    "OutputExistsError": "finetune_kit.errors",
    "TemplateError": "finetune_kit.errors",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from finetune_kit.data.config import DataConfig
    from finetune_kit.data.conversations import Conversations
    from finetune_kit.data.registry import DatasetRegistry
    from finetune_kit.environment import Environment
    from finetune_kit.errors import (
        ConfigError,
        DatasetError,
        DatasetRowError,
        EnvironmentCheckError,
        FinetuneKitError,
        MissingDependencyError,
        ModelNotFoundError,
        OutputExistsError,
        TemplateError,
    )
    from finetune_kit.evaluate.evaluator import EvalReport, Evaluator
    from finetune_kit.export.config import ExportConfig
    from finetune_kit.export.exporter import Exporter
    from finetune_kit.export.merge import ExportedModel
    from finetune_kit.models.config import ModelConfig
    from finetune_kit.models.generation import GenerationConfig
    from finetune_kit.models.loaded import LoadedModel
    from finetune_kit.models.source import ModelSource
    from finetune_kit.serve.config import ServeConfig
    from finetune_kit.serve.server import Server
    from finetune_kit.train.config import LoraConfig, TrainingConfig
    from finetune_kit.train.result import TrainResult
    from finetune_kit.train.trainer import LoraTrainer


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'finetune_kit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
