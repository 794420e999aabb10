"""The Train tab's form: the YAML it writes is what `finetune-kit train` runs, it loads back unchanged, and
every problem (bad values, no dataset, a used output_dir) is reported before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_kit import ConfigError, OutputExistsError
from finetune_kit.cli.commands import COMMANDS
from finetune_kit.config.parse import build, collect
from finetune_kit.config.run import RunConfig
from finetune_kit.data.config import DataConfig, EncodingConfig
from finetune_kit.train.config import TrainingConfig
from finetune_kit.train_command import train_checks
from finetune_kit.webui import form
from finetune_kit.webui.form import DEMO_DATA


def filled(**changes) -> dict:
    values = form.defaults()
    values.update(dataset=["shop_alpaca", "shop_sharegpt"], dataset_dir=str(DEMO_DATA), output_dir="saves/x")
    values.update(changes)
    return values


def test_the_form_checks_with_the_train_commands_sections_and_rules():
    assert form.TRAIN_SECTIONS is COMMANDS["train"].sections and COMMANDS["train"].checks == (train_checks,)
    with pytest.raises(ConfigError, match="val_size and eval_dataset cannot both be set"):
        form.check(form.form_values(filled(val_size=0.1), "eval_dataset: shop_test"))


def test_the_saved_yaml_is_what_finetune_kit_train_parses(tmp_path: Path):
    values = form.form_values(filled(compute_type="bf16", max_samples=0, template="chatml"), "weight_decay: 0.01\n")
    path = form.save_yaml(values, tmp_path / "configs" / "shop.yaml")
    assert form.command_line(path) == f"finetune-kit train {path}"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("### model\nmodel_name_or_path: bundled:smollm2-135m-instruct\ntemplate: chatml\n")
    assert "### extra\nweight_decay: 0.01\n" in text
    built = build(collect([str(path)]), COMMANDS["train"].sections, checks=(train_checks,))
    assert built[RunConfig].do_train
    assert built[DataConfig].dataset == ("shop_alpaca", "shop_sharegpt")
    assert built[DataConfig].max_samples is None  # 0 in the form means every row
    assert built[EncodingConfig].cutoff_len == 2048
    assert built[TrainingConfig].weight_decay == 0.01
    training = built[TrainingConfig]
    assert (training.bf16, training.fp16, training.plot_loss) == (True, False, True)
    assert (training.per_device_train_batch_size, training.gradient_accumulation_steps) == (2, 8)
    assert isinstance(training.max_steps, int) and training.max_steps == -1


def test_a_saved_yaml_loads_back_into_the_same_form(tmp_path: Path):
    values = form.form_values(filled(compute_type="fp16", resume_from_checkpoint="latest"), "weight_decay: 0.1\n")
    path = form.save_yaml(values, tmp_path / "a.yaml")
    loaded, extra = form.from_yaml(path)
    assert loaded["dataset"] == ["shop_alpaca", "shop_sharegpt"]
    assert (loaded["compute_type"], loaded["resume_from_checkpoint"]) == ("fp16", "latest")
    assert extra == "weight_decay: 0.1\n"
    assert form.form_values(loaded, extra) == values


def test_an_llamafactory_yaml_fills_the_form_and_keeps_the_keys_it_has_no_field_for(tmp_path: Path):
    path = tmp_path / "lf.yaml"
    path.write_text(
        "model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct\nstage: sft\ndo_train: true\nfinetuning_type: lora\n"
        "lora_target: [q_proj, v_proj]\ndataset: alpaca_zh_demo,identity\ntemplate: qwen\ncutoff_len: 1024\n"
        "output_dir: saves/qwen\nbf16: true\nddp_timeout: 180000000\ntrust_remote_code: true\n",
        encoding="utf-8",
    )
    loaded, extra = form.from_yaml(path)
    assert loaded["model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert (loaded["dataset"], loaded["lora_target"], loaded["compute_type"]) == (
        ["alpaca_zh_demo", "identity"],
        "q_proj,v_proj",
        "bf16",
    )
    assert extra == "ddp_timeout: 180000000\ntrust_remote_code: true\n"


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        form.check(form.form_values(filled(dataset=[], learning_rate=-1, lora_rank=0, stage="ppo")))
    message = str(err.value)
    assert message.startswith("Cannot start training (4 problems)")
    for part in ("no dataset chosen. Fix:", "learning_rate: got -1.0", "lora_rank: got 0", "stage: got 'ppo'"):
        assert part in message


def test_unknown_extra_keys_and_repeated_keys_are_refused():
    with pytest.raises(ConfigError, match="unknown key 'lora_rnak'. Did you mean 'lora_rank'"):
        form.check(form.form_values(filled(), "lora_rnak: 4"))
    with pytest.raises(ConfigError, match="'cutoff_len' is set in the form and again in the extra keys"):
        form.form_values(filled(), "cutoff_len: 64")
    with pytest.raises(ConfigError, match="must be 'key: value' lines"):
        form.form_values(filled(), "- a list")


def test_a_used_output_dir_is_refused_unless_the_user_chooses(tmp_path: Path):
    out = tmp_path / "run"
    form.check_output_dir({"output_dir": str(out)})  # new: fine
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists and is not empty. Fix: choose a new output_dir"):
        form.check_output_dir({"output_dir": str(out)})
    form.check_output_dir({"output_dir": str(out), "overwrite_output_dir": True})
    checkpoint = out / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="checkpoint-4. Fix: choose 'latest'"):
        form.check_output_dir({"output_dir": str(out)})
    form.check_output_dir({"output_dir": str(out), "resume_from_checkpoint": "latest"})


def test_saving_never_replaces_a_file_unasked(tmp_path: Path):
    path = tmp_path / "a.yaml"
    path.write_text("mine", encoding="utf-8")
    with pytest.raises(OutputExistsError, match="already exists. Fix: choose another file name"):
        form.save_yaml(form.form_values(filled()), path)
    assert path.read_text(encoding="utf-8") == "mine"
    form.save_yaml(form.form_values(filled()), path, overwrite=True)
    assert "do_train: true" in path.read_text(encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a .yaml file name"):
        form.save_yaml(form.form_values(filled()), tmp_path / "a.txt")


def test_default_output_dirs_follow_llama_boards_naming():
    out = form.default_output_dir("bundled:smollm2-135m-instruct")
    assert out.startswith(str(Path("saves", "smollm2-135m-instruct", "lora", "train_")))
    assert Path(form.default_output_dir("Qwen/Qwen2.5-0.5B-Instruct", "full")).parts[:3] == (
        "saves",
        "Qwen2.5-0.5B-Instruct",
        "full",
    )
