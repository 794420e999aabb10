"""LoraTrainer: what changes, what stays frozen, what is written, and that the bundled model learns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune_kit import DatasetRegistry, LoraTrainer, OutputExistsError, TrainResult
from finetune_kit.errors import ConfigError, EnvironmentCheckError, FinetuneKitWarning

ROWS = [
    {"instruction": "你们包邮吗？", "input": "", "output": "满九十九元包邮。"},
    {"instruction": "Do you ship abroad?", "input": "", "output": "No, we only ship within China."},
    {"instruction": "多久发货？", "input": "", "output": "四十八小时内发货。"},
    {"instruction": "Can I pay by card?", "input": "", "output": "Yes, all major cards work."},
]


def write_dataset(folder: Path, rows: list[dict] = ROWS) -> DatasetRegistry:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
    return DatasetRegistry.from_dir(folder)


def quick_trainer(model, out: Path, **training) -> LoraTrainer:
    settings = dict(
        output_dir=str(out),
        learning_rate=1e-2,
        max_steps=3,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_steps=1000,
        disable_tqdm=True,
        report_to="none",
    )
    settings.update(training)
    return LoraTrainer(model).with_lora(lora_rank=4).with_data(cutoff_len=64).with_training(**settings)


def test_lora_weights_change_and_base_weights_stay_frozen(tiny_llama, tmp_path):
    data = write_dataset(tmp_path / "data").load("tiny")
    before = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
    result = quick_trainer(tiny_llama, tmp_path / "out").train(data)
    # the caller's model is handed back without LoRA layers and with identical weights
    after = tiny_llama.model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(tiny_llama.model, "peft_config")
    tuned = result.load()
    lora = {k: v for k, v in tuned.model.state_dict().items() if "lora_B" in k}
    assert lora and any(v.abs().sum() > 0 for v in lora.values()), "lora_B starts at zero and must have moved"
    base = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in tuned.model.state_dict().items()
        if "lora_" not in k
    }
    assert all(torch.equal(base[k], before[k]) for k in before)


def test_all_linear_layers_but_the_head_are_targeted(tiny_llama):
    targets = LoraTrainer(tiny_llama).target_modules()
    assert targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert LoraTrainer(tiny_llama).with_lora(lora_target="q_proj,v_proj").target_modules() == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="match no linear layer.*q_proj"):
        LoraTrainer(tiny_llama).with_lora(lora_target="qkv").target_modules()


def test_output_dir_holds_every_artifact(tiny_llama, tmp_path):
    data = write_dataset(tmp_path / "data").load("tiny")
    out = tmp_path / "out"
    result = quick_trainer(tiny_llama, out, plot_loss=True).train(data)
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "finetune_kit_config.json",
        "trainer_log.jsonl",
        "training_loss.png",
        "trainer_state.json",
    ):
        assert (out / name).is_file(), name
    saved = json.loads((out / "finetune_kit_config.json").read_text())
    assert saved["finetune_kit_version"]
    assert saved["config"]["lora"]["lora_rank"] == 4
    assert saved["resolved"]["template"] == "chatml"
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["current_steps"] for r in log if "loss" in r] == [1, 2, 3]
    assert result.plots == (out / "training_loss.png",)
    reopened = TrainResult.from_dir(out)
    assert reopened.base.display_name == tiny_llama.source.display_name
    assert len(reopened.losses) == 3


def test_existing_output_dir_is_never_overwritten_by_default(tiny_llama, tmp_path):
    data = write_dataset(tmp_path / "data").load("tiny")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="overwrite_output_dir"):
        quick_trainer(tiny_llama, out).train(data)
    quick_trainer(tiny_llama, out, overwrite_output_dir=True).train(data)
    assert (out / "notes.txt").read_text() == "mine"


def test_rerun_resumes_from_the_last_checkpoint(tiny_llama, tmp_path):
    data = write_dataset(tmp_path / "data").load("tiny")
    out = tmp_path / "out"
    quick_trainer(tiny_llama, out, max_steps=2, save_steps=2).train(data)
    assert (out / "checkpoint-2").is_dir()
    first_log = (out / "trainer_log.jsonl").read_text().splitlines()
    with pytest.warns(FinetuneKitWarning, match="Resuming training from"):
        result = quick_trainer(tiny_llama, out, max_steps=4, save_steps=2).train(data)
    steps = [e["step"] for e in result.log_history if "loss" in e]
    assert steps == [1, 2, 3, 4]
    log = (out / "trainer_log.jsonl").read_text().splitlines()
    # the first run's lines (with their own timings) are kept and the resumed run appends steps 3 and 4
    resumed = [json.loads(x) for x in log[len(first_log) :]]
    assert log[: len(first_log)] == first_log and [r["current_steps"] for r in resumed if "loss" in r] == [3, 4]


def test_save_strategy_no_keeps_only_the_final_model(tiny_llama, tmp_path):
    data = write_dataset(tmp_path / "data").load("tiny")
    out = tmp_path / "out"
    quick_trainer(tiny_llama, out, max_steps=2, save_steps=1, save_strategy="no").train(data)
    assert not list(out.glob("checkpoint-*")) and (out / "adapter_model.safetensors").is_file()
    quick_trainer(tiny_llama, tmp_path / "steps", max_steps=2, save_steps=1).train(data)
    assert sorted(p.name for p in (tmp_path / "steps").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_accumulation_matches_a_larger_batch(tiny_llama, tmp_path):
    data = write_dataset(tmp_path / "data").load("tiny")
    a = (
        quick_trainer(
            tiny_llama, tmp_path / "a", max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=1
        )
        .train(data)
        .load()
    )
    b = (
        quick_trainer(
            tiny_llama, tmp_path / "b", max_steps=1, per_device_train_batch_size=1, gradient_accumulation_steps=4
        )
        .train(data)
        .load()
    )
    sa, sb = a.model.state_dict(), b.model.state_dict()
    lora = [k for k in sa if "lora_" in k]
    assert lora
    for k in lora:
        torch.testing.assert_close(sa[k], sb[k], atol=2e-5, rtol=1e-4)


def test_bf16_on_a_cpu_machine_fails_with_the_fix(tiny_llama, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    data = write_dataset(tmp_path / "data").load("tiny")
    with pytest.raises(EnvironmentCheckError, match="bf16: false"):
        quick_trainer(tiny_llama, tmp_path / "out", bf16=True).train(data)


def test_explain_names_the_plan(tiny_llama, tmp_path):
    data = write_dataset(tmp_path / "data").load("tiny")
    text = quick_trainer(tiny_llama, tmp_path / "out", gradient_accumulation_steps=2).explain(data)
    devices = max(torch.cuda.device_count(), 1)  # several visible GPUs: transformers.Trainer uses them all
    assert "q_proj" in text and "2 accumulation" in text and f"= {4 * devices} per step" in text
    assert "TokenizedDataset(4 examples" in text


@pytest.mark.slow
def test_bundled_model_memorises_a_tiny_dataset(bundled_model, tmp_path):
    from finetune_kit.models.generation import GREEDY
    from finetune_kit.models.source import ModelSource

    model = ModelSource.bundled().load(template="chatml")
    data = write_dataset(tmp_path / "data").load("tiny")
    result = (
        LoraTrainer(model)
        .with_lora(lora_rank=8, lora_alpha=16)
        .with_data(cutoff_len=128)
        .with_training(
            output_dir=str(tmp_path / "out"),
            learning_rate=2e-3,
            max_steps=24,
            per_device_train_batch_size=4,
            lr_scheduler_type="constant",
            logging_steps=4,
            save_steps=1000,
            disable_tqdm=True,
        )
    ).train(data)
    losses = [loss for _, loss in result.losses]
    assert losses[-1] < losses[0] / 5, f"loss did not fall enough: {losses}"
    tuned = result.load()
    answers = tuned.generate([e.prompt_messages for e in data.examples], GREEDY.with_(max_new_tokens=40))
    assert [a.text for a in answers] == [e.label for e in data.examples]
    assert all(a.finish_reason == "stop" for a in answers)
