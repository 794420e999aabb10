"""The public surface: ``finetune_kit.__all__`` is exactly the curated set and importing it stays cheap."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import finetune_kit

EXPECTED = sorted(
    [
        "Environment",
        "ModelSource",
        "LoadedModel",
        "ModelConfig",
        "GenerationConfig",
        "DatasetRegistry",
        "Conversations",
        "DataConfig",
        "LoraTrainer",
        "LoraConfig",
        "TrainingConfig",
        "MethodConfig",
        "PreferenceConfig",
        "TrainResult",
        "TrainingPlan",
        "Evaluator",
        "EvalReport",
        "Exporter",
        "ExportConfig",
        "ExportedModel",
        "GgufExport",
        "Server",
        "ServeConfig",
        "FinetuneKitError",
        "ConfigError",
        "TrainingError",
        "TrainingInterrupted",
        "ExportError",
        "DatasetError",
        "DatasetRowError",
        "DatasetRowsError",
        "ModelNotFoundError",
        "EnvironmentCheckError",
        "MissingDependencyError",
        "OutputExistsError",
        "TemplateError",
        "LoadPlan",
        "DatasetSpec",
        "Completion",
        "Engine",
        "ChatTemplate",
        "Example",
        "EncodingConfig",
        "TokenizedDataset",
        "PredictConfig",
        "BenchmarkConfig",
        "BenchmarkResult",
        "Comparison",
        "ServerHandle",
        "FinetuneKitWarning",
        "UnknownKeysError",
        "RequestError",
        "__version__",
    ]
)


def test_all_is_the_curated_set():
    assert sorted(finetune_kit.__all__) == EXPECTED
    assert len(finetune_kit.__all__) == len(set(finetune_kit.__all__))


def test_dir_lists_the_public_names():
    assert dir(finetune_kit) == EXPECTED


def test_version_matches_the_installed_distribution():
    import importlib.metadata

    assert finetune_kit.__version__ == importlib.metadata.version("finetune-kit")


@pytest.mark.parametrize("name", [n for n in EXPECTED if n != "__version__"])
def test_every_public_name_resolves(name):
    importlib.import_module(finetune_kit._EXPORTS[name])
    value = getattr(finetune_kit, name)
    assert isinstance(value, type)
    assert value.__name__ == name


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
        finetune_kit.NotAThing  # noqa: B018


def test_import_is_cheap():
    code = (
        "import sys, finetune_kit, finetune_kit.errors\n"
        "heavy = [m for m in ('torch', 'transformers', 'fastapi', 'datasets', 'peft') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
