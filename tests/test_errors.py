"""The exception tree: every error is a FinetuneKitError *and* the builtin it refines."""

from __future__ import annotations

import pytest

from finetune_kit import errors
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
    UnknownKeysError,
    did_you_mean,
)


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (ConfigError, ValueError),
        (UnknownKeysError, ValueError),
        (DatasetError, ValueError),
        (DatasetRowError, ValueError),
        (TemplateError, ValueError),
        (ModelNotFoundError, FileNotFoundError),
        (OutputExistsError, FileExistsError),
        (EnvironmentCheckError, RuntimeError),
        (MissingDependencyError, ImportError),
    ],
)
def test_each_error_is_a_finetune_kit_error_and_its_builtin(cls, builtin):
    assert issubclass(cls, FinetuneKitError)
    assert issubclass(cls, builtin)


def test_every_exception_in_the_module_is_in_the_tree():
    classes = [
        v
        for v in vars(errors).values()
        if isinstance(v, type) and issubclass(v, Exception) and not issubclass(v, Warning)
    ]
    assert len(classes) >= 10
    assert [c.__name__ for c in classes if not issubclass(c, FinetuneKitError)] == []
    assert issubclass(errors.FinetuneKitWarning, UserWarning)


def test_specific_refinements():
    assert issubclass(UnknownKeysError, ConfigError)
    assert issubclass(DatasetRowError, DatasetError)
    assert issubclass(MissingDependencyError, EnvironmentCheckError)


def test_except_builtin_catches_our_errors():
    with pytest.raises(ValueError):
        raise ConfigError("lora_rank: got 0")
    with pytest.raises(FileNotFoundError):
        raise ModelNotFoundError("no such model")
    with pytest.raises(FileExistsError):
        raise OutputExistsError("saves/x is not empty")
    with pytest.raises(ImportError):
        raise MissingDependencyError("fastapi", purpose="Serving", extra="serve")


def test_config_error_lists_every_problem():
    one = ConfigError("lora_rank: got 0")
    assert one.problems == ["lora_rank: got 0"]
    assert str(one) == "Invalid configuration: lora_rank: got 0"
    many = ConfigError(["a is bad", "b is bad"], header="Invalid lora configuration")
    assert many.problems == ["a is bad", "b is bad"]
    assert str(many) == "Invalid lora configuration (2 problems):\n  - a is bad\n  - b is bad"


def test_dataset_row_error_carries_file_row_field_and_fix():
    exc = DatasetRowError(file="data/x.json", row=3, field="output", problem="the column is missing", fix="add it")
    assert (exc.file, exc.row, exc.field) == ("data/x.json", 3, "output")
    assert str(exc) == "data/x.json, row 3, field 'output': the column is missing. Fix: add it"
    assert isinstance(exc, ValueError)


def test_missing_dependency_names_the_pip_command():
    extra = MissingDependencyError("fastapi", purpose="Serving an API", extra="serve")
    assert extra.package == "fastapi"
    assert 'pip install "finetune-kit[serve]"' in str(extra)
    assert "Serving an API" in str(extra)
    plain = MissingDependencyError("jieba", purpose="Chinese ROUGE")
    assert "pip install jieba" in str(plain)


def test_did_you_mean():
    assert did_you_mean("lora_rnk", ["lora_rank", "lora_alpha"]) == " Did you mean 'lora_rank'?"
    assert did_you_mean("zzzz", ["lora_rank"]) == ""
