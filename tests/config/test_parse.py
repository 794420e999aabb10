"""YAML + command-line overrides mapped onto the stage configs, with every problem reported at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from finetune_kit.config.compat import ONLY_FALSE
from finetune_kit.config.parse import build, collect, describe, read_config_file, split_argv
from finetune_kit.config.run import RunConfig
from finetune_kit.data.config import DataConfig, EncodingConfig
from finetune_kit.errors import ConfigError, UnknownKeysError
from finetune_kit.models.config import ModelConfig
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.train.config import LoraConfig, MethodConfig, TrainingConfig

BASE_SECTIONS = [
    RunConfig,
    ModelConfig,
    DataConfig,
    EncodingConfig,
    LoraConfig,
    TrainingConfig,
    GenerationConfig,
    MethodConfig,
]


def predict_config():
    from finetune_kit.evaluate.config import PredictConfig

    return PredictConfig


@pytest.fixture()
def lf_yaml_file(tmp_path: Path, lf_yaml) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(lf_yaml(tmp_path / "data", tmp_path / "saves" / "shop"), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- split_argv
def test_split_argv_all_override_styles():
    files, overrides = split_argv(
        [
            "train.yaml",
            "learning_rate=1e-4",
            "--lora_rank",
            "16",
            "--cutoff_len=512",
            "--do_eval",
            "--lora-alpha",
            "32",
            "--plot_loss",
        ]
    )
    assert files == ["train.yaml"]
    assert overrides == {
        "learning_rate": "1e-4",
        "lora_rank": "16",
        "cutoff_len": "512",
        "do_eval": "true",
        "lora_alpha": "32",
        "plot_loss": "true",
    }


def test_split_argv_values_may_contain_equals_and_negative_numbers():
    _, overrides = split_argv(["--default_system=a=b", "max_steps=-1", "--seed", "-3"])
    assert overrides == {"default_system": "a=b", "max_steps": "-1", "seed": "-3"}


def test_split_argv_bare_flag_before_a_key_value_override():
    files, overrides = split_argv(["--do_eval", "val_size=0.1"])
    assert overrides == {"do_eval": "true", "val_size": "0.1"}


def test_split_argv_existing_path_with_equals_is_a_file(tmp_path):
    odd = tmp_path / "run=1.yaml"
    odd.write_text("lora_rank: 4\n")
    files, overrides = split_argv([str(odd)])
    assert files == [str(odd)] and overrides == {}


def test_collect_later_values_win(lf_yaml_file):
    values = collect([str(lf_yaml_file), "lora_rank=32", "--learning_rate", "5e-4"])
    assert values["lora_rank"] == "32" and values["learning_rate"] == "5e-4"
    assert values["cutoff_len"] == 256  # from the YAML, typed by YAML


def test_collect_rejects_a_stray_argument():
    with pytest.raises(ConfigError, match="unexpected argument 'train.txt'"):
        collect(["train.txt"])


def test_read_config_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_config_file(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        read_config_file(listy)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert read_config_file(empty) == {}
    js = tmp_path / "c.json"
    js.write_text('{"lora_rank": 4}')
    assert read_config_file(js) == {"lora_rank": 4}


# ---------------------------------------------------------------------------------------------- build
def check_lf_yaml_values(cfg, tmp_path: Path) -> None:
    run, model, data, encoding, lora, training, gen, method = (cfg[c] for c in BASE_SECTIONS)
    assert (method.stage, run.do_train, run.do_predict) == ("sft", True, False)
    assert model.model_name_or_path == "bundled:smollm2-135m-instruct"
    assert model.trust_remote_code is True and model.template == "chatml"
    assert data.dataset == ("shop",) and data.dataset_dir == str(tmp_path / "data")
    assert (encoding.cutoff_len, data.max_samples) == (256, 1000)
    assert (method.finetuning_type, lora.lora_rank, lora.lora_alpha, lora.lora_target) == ("lora", 8, 16, ("all",))
    assert lora.lora_dropout == 0.0 and isinstance(lora.lora_dropout, float)
    assert training.output_dir == str(tmp_path / "saves" / "shop")
    assert training.learning_rate == 1e-3 and isinstance(training.learning_rate, float)
    assert training.num_train_epochs == 10.0 and training.lr_scheduler_type == "constant"
    assert (training.per_device_train_batch_size, training.gradient_accumulation_steps, training.seed) == (4, 1, 0)
    assert (training.logging_steps, training.save_steps, training.plot_loss) == (2, 1000, True)
    assert training.overwrite_output_dir is True and training.report_to == ("none",)
    assert gen == GenerationConfig()


def test_lf_yaml_builds_every_section(lf_yaml_file, tmp_path, caplog):
    with caplog.at_level("INFO", logger="finetune_kit.config"):
        cfg = build(collect([str(lf_yaml_file)]), BASE_SECTIONS)
    assert set(cfg) == set(BASE_SECTIONS)
    check_lf_yaml_values(cfg, tmp_path)
    # the data-preparation keys of LLaMA-Factory's example YAMLs are the encoding's now
    assert cfg[EncodingConfig].overwrite_cache is True and cfg[EncodingConfig].preprocessing_num_workers == 1
    # outside training they change nothing and are named as ignored
    with caplog.at_level("INFO", logger="finetune_kit.config"):
        build(collect([str(lf_yaml_file)]), [s for s in BASE_SECTIONS if s is not EncodingConfig])
    assert "'overwrite_cache' is accepted for LLaMA-Factory compatibility and ignored" in caplog.text
    assert "'preprocessing_num_workers' is accepted" in caplog.text


def test_only_false_keys_are_accepted_when_false_and_refused_when_true(monkeypatch):
    monkeypatch.setitem(ONLY_FALSE, "some_switch", "it is planned")
    assert set(build({"some_switch": "false", "streaming": False}, [DataConfig])) == {DataConfig}
    with pytest.raises(UnknownKeysError, match="some_switch: true is not supported yet"):
        build({"some_switch": True}, [DataConfig])


def test_cross_section_checks_join_the_other_problems():
    def needs_dataset(built):
        return [] if built[DataConfig].dataset else ["do_train needs a dataset"]

    with pytest.raises(UnknownKeysError) as err:
        build({"lora_rnak": 4}, [DataConfig, LoraConfig], checks=[needs_dataset])
    assert len(err.value.problems) == 2 and "do_train needs a dataset" in err.value.problems


def test_lf_yaml_builds_the_train_commands_sections(lf_yaml_file, tmp_path):
    predict = predict_config()
    sections = [*BASE_SECTIONS, predict]
    cfg = build(collect([str(lf_yaml_file)]), sections)
    assert set(cfg) == set(sections)
    check_lf_yaml_values(cfg, tmp_path)
    assert isinstance(cfg[predict], predict)


def test_overrides_beat_the_yaml(lf_yaml_file):
    cfg = build(
        collect([str(lf_yaml_file), "lora_rank=16", "--learning_rate", "2e-4", "val_size=0.1", "--do_eval"]),
        BASE_SECTIONS,
    )
    assert cfg[LoraConfig].lora_rank == 16
    assert cfg[TrainingConfig].learning_rate == 2e-4
    assert cfg[RunConfig].do_eval is True
    assert cfg[DataConfig].val_size == 0.1


def test_unknown_unsupported_and_bad_values_are_reported_together(lf_yaml_file):
    argv = [str(lf_yaml_file), "lora_rnak=4", "--ref_model", "org/ref", "use_galore=true", "learning_rate=abc"]
    with pytest.raises(UnknownKeysError) as err:
        build(collect(argv), BASE_SECTIONS)
    problems = err.value.problems
    assert len(problems) == 4
    assert "unknown key 'lora_rnak'. Did you mean 'lora_rank'?" in problems
    assert any(p.startswith("'ref_model' is a LLaMA-Factory key") and "Fix: remove it" in p for p in problems)
    assert any(p.startswith("'use_galore' is a LLaMA-Factory key") and "QLoRA" in p for p in problems)
    assert "learning_rate: got 'abc'; expected a number" in problems
    assert isinstance(err.value, ConfigError) and isinstance(err.value, ValueError)


def test_bad_values_alone_are_a_config_error():
    with pytest.raises(ConfigError) as err:
        build({"learning_rate": "abc", "lora_rank": 0, "stage": "ppo", "do_train": True}, BASE_SECTIONS)
    assert not isinstance(err.value, UnknownKeysError)
    assert len(err.value.problems) == 3


def test_a_key_shared_by_sections_is_checked_once():
    cfg = build({"lora_rank": "4"}, [LoraConfig, LoraConfig])
    assert cfg[LoraConfig].lora_rank == 4
    with pytest.raises(ConfigError) as err:
        build({"lora_rank": "x"}, [LoraConfig, LoraConfig])
    assert err.value.problems == ["lora_rank: got 'x'; expected an integer"]


def test_describe_lists_keys_with_help_and_defaults():
    text = describe([LoraConfig])
    assert "lora keys (LoraConfig):" in text
    line = next(ln for ln in text.splitlines() if "--lora_rank " in ln)
    assert "LoRA rank r." in line and "[default: 8]" in line
    assert "[default: all]" in next(ln for ln in text.splitlines() if "--lora_target " in ln)


# ---------------------------------------------------------------------------------------------- the real CLI
def cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("finetune-kit")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "finetune_kit.cli.main"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


def test_cli_reports_every_problem_without_a_traceback():
    predict_config()
    out = cli(
        "train",
        "do_train=true",
        "--bogus",
        "1",
        "--ref_model",
        "org/ref",
        "learning_rate=abc",
        "model_name_or_path=bundled:smollm2-135m-instruct",
    )
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("finetune-kit train: error: Invalid configuration (3 problems):")
    assert "unknown key 'bogus'" in out.stderr
    assert "'ref_model' is a LLaMA-Factory key" in out.stderr
    assert "learning_rate: got 'abc'; expected a number" in out.stderr


def test_cli_help():
    out = cli("--help")
    assert out.returncode == 0
    assert out.stdout.startswith("usage: finetune-kit <command>")
    assert "train" in out.stdout and "export" in out.stdout


def test_cli_train_help_lists_keys_with_their_help():
    predict_config()
    out = cli("train", "--help")
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.strip().startswith("--lora_rank "))
    assert "LoRA rank r." in line
    assert "--learning_rate" in out.stdout and "--model_name_or_path" in out.stdout


def test_cli_unknown_command_suggests_one():
    out = cli("trian")
    assert out.returncode == 2
    assert "unknown command 'trian'. Did you mean 'train'?" in out.stderr
