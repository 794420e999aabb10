"""StageConfig: coercion of YAML/CLI text by annotation, validation of every field at once, frozen copies."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from finetune_kit.config.base import coerce
from finetune_kit.data.config import EncodingConfig
from finetune_kit.errors import ConfigError
from finetune_kit.models.config import ModelConfig
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.train.config import LoraConfig, TrainingConfig


@pytest.mark.parametrize(
    ("value", "annotation", "expected"),
    [
        ("true", bool, True),
        ("False", bool, False),
        ("yes", bool, True),
        ("0", bool, False),
        (1, bool, True),
        ("1e-3", float, 1e-3),
        ("5", float, 5.0),
        (2, float, 2.0),
        ("8", int, 8),
        ("8.0", int, 8),
        ("1e3", int, 1000),
        (4.0, int, 4),
        ("q_proj,v_proj", tuple[str, ...], ("q_proj", "v_proj")),
        (" q_proj , v_proj ,", tuple[str, ...], ("q_proj", "v_proj")),
        (["a", "b"], tuple[str, ...], ("a", "b")),
        ("all", tuple[str, ...], ("all",)),
        ("null", str | None, None),
        ("None", int | None, None),
        ("~", tuple[str, ...] | None, None),
        (None, float | None, None),
        ("3", int | None, 3),
        ("x,y", tuple[str, ...] | None, ("x", "y")),
        (7, str, "7"),
        ("Cosine", Literal["linear", "cosine"], "cosine"),
    ],
)
def test_coerce_converts_by_annotation(value, annotation, expected):
    result = coerce(value, annotation, "key")
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("value", "annotation", "message"),
    [
        ("abc", float, "key: got 'abc'; expected a number"),
        (True, float, "expected a number"),
        ("2.5", int, "key: got '2.5'; expected an integer"),
        (True, int, "expected an integer"),
        ("maybe", bool, "key: got 'maybe'; expected true or false"),
        (2, bool, "expected true or false"),
        (3, tuple[str, ...], "expected a comma-separated list"),
        (["x"], str, "expected a string"),
        ("abc", int | None, "expected an integer"),
    ],
)
def test_coerce_rejects_with_the_value_and_expectation(value, annotation, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        coerce(value, annotation, "key")


def test_yaml_bare_no_reads_as_the_no_choice():
    # YAML 1.1 turns `save_strategy: no` into False
    assert coerce(False, Literal["steps", "epoch", "no"], "save_strategy") == "no"
    with pytest.raises(ValueError, match="expected one of"):
        coerce(False, Literal["linear", "cosine"], "lr_scheduler_type")


def test_literal_suggests_the_close_value():
    with pytest.raises(ValueError) as err:
        coerce("cosin", Literal["linear", "cosine"], "lr_scheduler_type")
    assert str(err.value) == (
        "lr_scheduler_type: got 'cosin'; expected one of 'linear', 'cosine'. Did you mean 'cosine'?"
    )


def test_config_coerces_cli_strings_on_construction():
    cfg = TrainingConfig(
        learning_rate="1e-3",
        per_device_train_batch_size="8",
        bf16="false",
        report_to="none",
        resume_from_checkpoint="null",
        lr_scheduler_type="COSINE",
    )
    assert cfg.learning_rate == 1e-3 and isinstance(cfg.learning_rate, float)
    assert cfg.per_device_train_batch_size == 8 and isinstance(cfg.per_device_train_batch_size, int)
    assert cfg.bf16 is False
    assert cfg.report_to == ("none",)
    assert cfg.resume_from_checkpoint is None
    assert cfg.lr_scheduler_type == "cosine"
    lora = LoraConfig(lora_target="q_proj,v_proj", lora_rank="16", lora_alpha="null")
    assert lora.lora_target == ("q_proj", "v_proj") and lora.lora_rank == 16 and lora.lora_alpha is None
    assert lora.alpha == 32


def test_every_bad_field_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        TrainingConfig(learning_rate="abc", lr_scheduler_type="cosin", seed="x")
    assert len(err.value.problems) == 3
    text = str(err.value)
    assert text.startswith("Invalid training configuration (3 problems):")
    assert "Did you mean 'cosine'?" in text and "seed: got 'x'" in text


def test_cross_field_checks_report_every_problem():
    with pytest.raises(ConfigError) as err:
        TrainingConfig(per_device_train_batch_size=0, bf16=True, fp16=True, learning_rate=-1)
    assert len(err.value.problems) == 3
    with pytest.raises(ConfigError, match="mask_history and train_on_prompt"):
        EncodingConfig(mask_history=True, train_on_prompt=True)
    with pytest.raises(ConfigError, match="top_p"):
        GenerationConfig(top_p=0)


def test_configs_are_frozen():
    cfg = LoraConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lora_rank = 16  # type: ignore[misc]


def test_with_returns_a_validated_copy():
    cfg = LoraConfig()
    new = cfg.with_(lora_rank="16", lora_target="q_proj,v_proj")
    assert new is not cfg and isinstance(new, LoraConfig)
    assert (new.lora_rank, new.lora_target) == (16, ("q_proj", "v_proj"))
    assert (cfg.lora_rank, cfg.lora_target) == (8, ("all",))
    with pytest.raises(ConfigError, match="lora_rank: got 0"):
        cfg.with_(lora_rank=0)
    with pytest.raises(ConfigError, match="expected an integer"):
        cfg.with_(lora_rank="many")


def test_with_unknown_key_suggests_the_field():
    with pytest.raises(ConfigError) as err:
        LoraConfig().with_(lora_rnak=4, bogus=1)
    assert err.value.problems == [
        "unknown key 'bogus' for LoraConfig.",
        "unknown key 'lora_rnak' for LoraConfig. Did you mean 'lora_rank'?",
    ]


def test_to_dict_and_help():
    cfg = LoraConfig(lora_target="q_proj,v_proj")
    d = cfg.to_dict()
    assert d["lora_target"] == ["q_proj", "v_proj"]
    assert LoraConfig(**d) == cfg
    assert LoraConfig.help_of("lora_rank") == "LoRA rank r."
    assert "lora_rank" in LoraConfig.field_names()


def test_repr_lists_only_changed_fields():
    assert repr(LoraConfig(lora_rank=16)) == "LoraConfig(lora_rank=16)"
    assert repr(ModelConfig(model_name_or_path="x")) == "ModelConfig(model_name_or_path='x')"
