"""Selective gradient checkpointing: only the first N decoder layers recompute, with the same numbers,
and ``gradient_checkpointing: auto`` picks the fewest layers the memory plan needs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_packing import examples, padded, tiny, write_dataset
from test_plan import LLAMA3_8B, _trainer, h100  # noqa: F401  (h100 is a fixture)

from finetune_kit import LoraTrainer
from finetune_kit.errors import ConfigError
from finetune_kit.train.budget import memory_inputs, resolve_checkpoint_layers
from finetune_kit.train.callbacks import CheckpointFirstLayers
from finetune_kit.train.config import TrainingConfig
from finetune_kit.train.vram import MemoryInputs, checkpointed_layers_needed, plan_memory

GIB = 2**30


def grads(model) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**padded(examples())).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_only_the_first_layers_recompute_and_the_numbers_stay():
    want_loss, want = grads(tiny())
    model = tiny()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    callback = CheckpointFirstLayers(1)
    callback.on_train_begin(None, None, None, model=model)
    assert callback.checkpointed == [True, False]
    calls = []
    for layer in model.model.layers:
        checkpoint = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, f=checkpoint, **k: calls.append(1) or f(*a, **k)
    got_loss, got = grads(model)
    assert len(calls) == 1  # the first of the two layers went through the checkpoint, the second did not
    torch.testing.assert_close(got_loss, want_loss)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_the_plan_falls_between_none_and_all_and_auto_picks_the_fewest(h100, tiny_llama_dir: Path):  # noqa: F811
    x = MemoryInputs(micro_batch=4, seq_len=2048)
    none = plan_memory(LLAMA3_8B, x).total
    every = plan_memory(LLAMA3_8B, x.with_(gradient_checkpointing=True)).total
    partial = [plan_memory(LLAMA3_8B, x.with_(gradient_checkpointing=True, checkpoint_layers=k)).total for k in (8, 16)]
    assert none > partial[0] > partial[1] > every
    assert plan_memory(LLAMA3_8B, x.with_(gradient_checkpointing=True, checkpoint_layers=32)).total == every
    gpu = 80 * 10**9
    k = checkpointed_layers_needed(LLAMA3_8B, x, gpu)
    assert 0 < k < 32  # ~90 GiB without, ~29 with all: a part of the layers is enough
    assert plan_memory(LLAMA3_8B, x.with_(gradient_checkpointing=True, checkpoint_layers=k)).fits(gpu)
    assert not plan_memory(LLAMA3_8B, x.with_(gradient_checkpointing=True, checkpoint_layers=k - 1)).fits(gpu)
    assert checkpointed_layers_needed(LLAMA3_8B, x.with_(seq_len=256), gpu) == 0
    assert checkpointed_layers_needed(LLAMA3_8B, x.with_(micro_batch=64), gpu) == 32  # even all is not enough

    big = _trainer(tiny_llama_dir, per_device_train_batch_size=4).with_data(cutoff_len=2048)
    on, layers = resolve_checkpoint_layers(big)  # its own inputs: bf16, the chunked loss
    assert on and layers == checkpointed_layers_needed(LLAMA3_8B, memory_inputs(big, checkpointing=False), gpu)
    assert layers is not None and 0 < layers < 32
    assert (
        f"checkpointing:    on in the first {layers} decoder layers (auto: the memory plan needs it)" in big.explain()
    )
    plan = big.plan()
    assert plan.inputs.checkpoint_layers == layers and plan.fits
    chosen = big.with_training(gradient_checkpointing_layers=20)
    assert resolve_checkpoint_layers(chosen) == (True, 20)  # the user's number wins
    assert resolve_checkpoint_layers(big.with_training(gradient_checkpointing=True)) == (True, None)  # all


def test_layers_without_checkpointing_are_refused():
    with pytest.raises(ConfigError, match="gradient_checkpointing_layers is set but gradient_checkpointing is false"):
        TrainingConfig(gradient_checkpointing=False, gradient_checkpointing_layers=4)
    with pytest.raises(ConfigError, match="gradient_checkpointing_layers: got 0"):
        TrainingConfig(gradient_checkpointing_layers=0)
    assert TrainingConfig(gradient_checkpointing_layers=4).gradient_checkpointing == "auto"


def test_a_trainer_checkpoints_only_the_layers_asked_for(tiny_llama, tmp_path: Path, monkeypatch):
    seen = []
    original = CheckpointFirstLayers.on_train_begin

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self.checkpointed)

    monkeypatch.setattr(CheckpointFirstLayers, "on_train_begin", record)
    result = (
        LoraTrainer(tiny_llama)
        .with_data(cutoff_len=64)
        .with_training(
            output_dir=str(tmp_path / "out"),
            max_steps=1,
            per_device_train_batch_size=4,
            gradient_checkpointing=True,
            gradient_checkpointing_layers=1,
        )
        .train(write_dataset(tmp_path / "data").load("tiny"))
    )
    assert seen == [[True, False]]
    assert result.metrics["train_loss"] > 0
