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

from finetune_kit._version import __version__

_EXPORTS = {
    "Environment": "finetune_kit.environment",
    "ModelSource": "finetune_kit.models.source",
    "LoadPlan": "finetune_kit.models.loader",
    "LoadedModel": "finetune_kit.models.loaded",
    "Completion": "finetune_kit.models.engine",
    "Engine": "finetune_kit.models.engine",
    "ModelConfig": "finetune_kit.models.config",
    "GenerationConfig": "finetune_kit.models.generation",
    "ChatTemplate": "finetune_kit.data.template",
    "DatasetRegistry": "finetune_kit.data.registry",
    "DatasetSpec": "finetune_kit.data.spec",
    "Conversations": "finetune_kit.data.conversations",
    "Example": "finetune_kit.data.conversations",
    "DataConfig": "finetune_kit.data.config",
    "EncodingConfig": "finetune_kit.data.config",
    "TokenizedDataset": "finetune_kit.data.tokenize",
    "LoraTrainer": "finetune_kit.train.trainer",
    "LoraConfig": "finetune_kit.train.config",
    "TrainingConfig": "finetune_kit.train.config",
    "MethodConfig": "finetune_kit.train.config",
    "PreferenceConfig": "finetune_kit.train.config",
    "TrainResult": "finetune_kit.train.result",
    "TrainingPlan": "finetune_kit.train.budget",
    "Evaluator": "finetune_kit.evaluate.evaluator",
    "EvalReport": "finetune_kit.evaluate.result",
    "PredictConfig": "finetune_kit.evaluate.config",
    "BenchmarkConfig": "finetune_kit.evaluate.config",
    "BenchmarkResult": "finetune_kit.evaluate.benchmark",
    "Comparison": "finetune_kit.evaluate.compare",
    "Exporter": "finetune_kit.export.exporter",
    "ExportConfig": "finetune_kit.export.config",
    "ExportedModel": "finetune_kit.export.result",
    "GgufExport": "finetune_kit.export.result",
    "Server": "finetune_kit.serve.server",
    "ServerHandle": "finetune_kit.serve.server",
    "ServeConfig": "finetune_kit.serve.config",
    "FinetuneKitError": "finetune_kit.errors",
    "FinetuneKitWarning": "finetune_kit.errors",
    "ConfigError": "finetune_kit.errors",
    "TrainingError": "finetune_kit.errors",
    "ExportError": "finetune_kit.errors",
    "TrainingInterrupted": "finetune_kit.errors",
    "UnknownKeysError": "finetune_kit.errors",
    "DatasetError": "finetune_kit.errors",
    "DatasetRowError": "finetune_kit.errors",
    "DatasetRowsError": "finetune_kit.errors",
    "ModelNotFoundError": "finetune_kit.errors",
    "EnvironmentCheckError": "finetune_kit.errors",
    "MissingDependencyError": "finetune_kit.errors",
    "OutputExistsError": "finetune_kit.errors",
    "TemplateError": "finetune_kit.errors",
    "RequestError": "finetune_kit.errors",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from finetune_kit.data.config import DataConfig, EncodingConfig
    from finetune_kit.data.conversations import Conversations, Example
    from finetune_kit.data.registry import DatasetRegistry
    from finetune_kit.data.spec import DatasetSpec
    from finetune_kit.data.template import ChatTemplate
    from finetune_kit.data.tokenize import TokenizedDataset
    from finetune_kit.environment import Environment
    from finetune_kit.errors import (
        ConfigError,
        DatasetError,
        DatasetRowError,
        DatasetRowsError,
        EnvironmentCheckError,
        FinetuneKitError,
        FinetuneKitWarning,
        MissingDependencyError,
        ModelNotFoundError,
        OutputExistsError,
        RequestError,
        TemplateError,
        UnknownKeysError,
    )
    from finetune_kit.evaluate.benchmark import BenchmarkResult
    from finetune_kit.evaluate.compare import Comparison
    from finetune_kit.evaluate.config import BenchmarkConfig, PredictConfig
    from finetune_kit.evaluate.evaluator import Evaluator
    from finetune_kit.evaluate.result import EvalReport
    from finetune_kit.export.config import ExportConfig
    from finetune_kit.export.exporter import Exporter
    from finetune_kit.export.result import ExportedModel
    from finetune_kit.models.config import ModelConfig
    from finetune_kit.models.engine import Completion, Engine
    from finetune_kit.models.generation import GenerationConfig
    from finetune_kit.models.loaded import LoadedModel
    from finetune_kit.models.loader import LoadPlan
    from finetune_kit.models.source import ModelSource
    from finetune_kit.serve.config import ServeConfig
    from finetune_kit.serve.server import Server, ServerHandle
    from finetune_kit.train.budget import TrainingPlan
    from finetune_kit.train.config import LoraConfig, MethodConfig, PreferenceConfig, TrainingConfig
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
