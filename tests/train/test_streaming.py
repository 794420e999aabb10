"""Training on streamed data: rows read lazily, real optimizer steps, same first batch as loaded data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_kit import ConfigError, DatasetRegistry, LoraTrainer

ROWS = [{"instruction": f"question {i}", "input": "", "output": f"answer number {i}"} for i in range(12)]


@pytest.fixture()
def registry(tmp_path: Path) -> DatasetRegistry:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "dataset_info.json").write_text(json.dumps({"t": {"file_name": "t.jsonl"}}))
    return DatasetRegistry.from_dir(folder)


def make(model, out: Path, **training) -> LoraTrainer:
    settings = dict(
        output_dir=out,
        learning_rate=5e-2,
        per_device_train_batch_size=4,
        save_steps=1000,
        disable_tqdm=True,
        logging_steps=1,
    )
    settings.update(training)
    return LoraTrainer(model).with_lora(lora_rank=4).with_data(cutoff_len=64).with_training(**settings)


def test_streamed_data_trains_for_max_steps(tiny_llama, registry, tmp_path):
    stream = registry.stream("t")
    trainer = make(tiny_llama, tmp_path / "s", max_steps=3, per_device_train_batch_size=12)
    assert "streamed from t" in trainer.explain(stream) and "steps:            3" in trainer.explain(stream)
    result = trainer.train(stream)
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert result.metrics["train_runtime"] > 0 and len(losses) == 3
    loaded = make(tiny_llama, tmp_path / "l", max_steps=1, per_device_train_batch_size=12).train(registry.load("t"))
    first_loaded = next(e["loss"] for e in loaded.log_history if "loss" in e)
    assert losses[0] == pytest.approx(first_loaded, abs=1e-4)  # one batch holds every row: the same first step


def test_streamed_data_needs_max_steps(tiny_llama, registry, tmp_path):
    with pytest.raises(ConfigError, match="max_steps"):
        make(tiny_llama, tmp_path / "x", num_train_epochs=1).train(registry.stream("t"))
