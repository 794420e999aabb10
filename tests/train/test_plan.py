"""The trainer's memory plan: ``LoraTrainer.plan()``, ``finetune-kit train --plan`` and
``gradient_checkpointing: auto``, from config.json only (the GPU is pretended where one is needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_kit import LoraTrainer, ModelSource
from finetune_kit.cli.main import main
from finetune_kit.train import budget
from finetune_kit.train.budget import TrainingPlan, resolve_checkpoint_layers
from finetune_kit.train.vram import ModelShape, plan_memory

GIB = 2**30
LLAMA3_8B = ModelShape.from_config(
    {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    }
)


@pytest.fixture
def h100(monkeypatch: pytest.MonkeyPatch) -> None:
    """One visible 80 GB GPU, and an 8B-shape model behind any trainer."""
    monkeypatch.setattr(budget, "visible_gpu_bytes", lambda: [80 * 10**9])
    monkeypatch.setattr(budget, "_shape", lambda trainer: LLAMA3_8B)


def _trainer(tiny_llama_dir: Path, **training) -> LoraTrainer:
    return (
        LoraTrainer(ModelSource.local(tiny_llama_dir))
        .with_lora(lora_rank=8, lora_target="all")
        .with_training(bf16=True, **training)
    )


def test_plan_without_a_gpu_reads_only_the_config(tiny_llama_dir: Path):
    plan = LoraTrainer(ModelSource.local(tiny_llama_dir)).with_data(cutoff_len=256).plan()
    assert isinstance(plan, TrainingPlan) and plan.fits is None
    text = plan.render()
    for part in ("weights", "activations", "logits", "total", "no CUDA GPU visible"):
        assert part in text
    assert plan.inputs.seq_len == 256 and plan.inputs.gradient_checkpointing is False


def test_auto_checkpointing_is_off_without_a_gpu(tiny_llama_dir: Path):
    assert resolve_checkpoint_layers(_trainer(tiny_llama_dir))[0] is False
    assert "checkpointing:    off (auto: no CUDA GPU)" in _trainer(tiny_llama_dir).explain()


def test_auto_checkpointing_turns_on_only_when_needed(h100, tiny_llama_dir: Path):
    big = _trainer(tiny_llama_dir, per_device_train_batch_size=4).with_data(cutoff_len=2048)
    small = _trainer(tiny_llama_dir, per_device_train_batch_size=1).with_data(cutoff_len=512)
    assert resolve_checkpoint_layers(big)[0] is True  # LLaMA-Factory's 8B YAML: ~80 GiB without, ~29 GiB with
    assert resolve_checkpoint_layers(small)[0] is False
    explicit = big.with_training(gradient_checkpointing=False)
    assert resolve_checkpoint_layers(explicit)[0] is False  # an explicit choice wins
    plan = big.plan()
    assert plan.fits is True and plan.inputs.gradient_checkpointing is True
    assert "(auto: the memory plan needs it)" in big.explain()  # in some of the layers: test_selective_checkpointing


def test_a_plan_that_does_not_fit_names_the_cheapest_fix(h100, tiny_llama_dir: Path):
    plan = (
        _trainer(tiny_llama_dir, per_device_train_batch_size=4, gradient_checkpointing=False)
        .with_data(cutoff_len=2048)
        .plan()
    )
    assert plan.fits is False
    assert plan.changes and plan.changes[0][0] == "gradient_checkpointing: true"
    assert "NO" in plan.render() and "gradient_checkpointing: true" in plan.render()


def test_the_plan_counts_launched_gpus_and_zero3(h100, tiny_llama_dir: Path):
    full = _trainer(tiny_llama_dir, per_device_train_batch_size=1, gradient_checkpointing=True).with_full()
    alone = full.plan()
    assert alone.fits is False  # 16 bytes per weight of an 8B model: far over 80 GB
    assert any("ds_z3" in change for change, _ in alone.changes)
    sharded = full.plan(gpus=4).inputs.with_(zero_stage=3)
    assert full.plan(gpus=4).inputs.n_gpus == 4
    assert plan_memory(LLAMA3_8B, sharded).total < alone.memory.total / 3


def test_cli_plan_prints_and_trains_nothing(tiny_llama_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "never"
    code = main(
        [
            "train",
            "--do_train",
            "true",
            "--model_name_or_path",
            str(tiny_llama_dir),
            "--template",
            "smollm2",
            "--dataset",
            "shop_alpaca",
            "--dataset_dir",
            str(Path(__file__).resolve().parents[2] / "finetune_kit" / "data" / "demo"),
            "--output_dir",
            str(out),
            "--plan",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "GPU memory plan" in text and "total" in text
    assert not out.exists()


def test_llamafactory_disable_gradient_checkpointing_is_understood():
    from finetune_kit.config.parse import build
    from finetune_kit.train.config import TrainingConfig

    def checkpointing(**values):
        return build(values, [TrainingConfig])[TrainingConfig].gradient_checkpointing

    assert checkpointing() == "auto"
    assert checkpointing(disable_gradient_checkpointing=True) is False
    assert checkpointing(disable_gradient_checkpointing="false") is True  # LLaMA-Factory's own default: on
    assert checkpointing(disable_gradient_checkpointing=True, gradient_checkpointing=True) is True  # ours wins
