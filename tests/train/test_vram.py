"""The GPU memory planner: parameter counts, monotonicity, ZeRO sharding, suggestions, rendering.

Only configs are used (meta-device modules where a real module tree is compared); no weights load.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from finetune_kit.errors import ConfigError
from finetune_kit.train.budget import visible_gpu_bytes
from finetune_kit.train.config import MethodConfig
from finetune_kit.train.lora import count_lora_params
from finetune_kit.train.methods import freeze_plan
from finetune_kit.train.vram import (
    GIB,
    PROJECTIONS,
    MemoryInputs,
    ModelShape,
    checkpointed_layers_needed,
    plan_memory,
    suggest,
)
from finetune_kit.train.vram_report import PARTS

QWEN_05B = dict(
    model_type="qwen2",
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    tie_word_embeddings=True,
)
LLAMA_8B = dict(
    model_type="llama",
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
    tie_word_embeddings=False,
)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
GPU_80 = 80 * GIB


@pytest.fixture(scope="module")
def qwen() -> ModelShape:
    return ModelShape.from_config(QWEN_05B)


@pytest.fixture(scope="module")
def llama() -> ModelShape:
    return ModelShape.from_config(LLAMA_8B)


def _meta_model(cfg):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def _config(arch: str, **fields):
    cls = LlamaConfig if arch == "llama" else Qwen2Config
    return cls(**{k: v for k, v in fields.items() if k != "model_type"})


def test_parameter_counts_of_the_two_shapes(qwen, llama):
    assert qwen.parameters == pytest.approx(494e6, rel=0.01)
    assert llama.parameters == pytest.approx(8.03e9, rel=0.01)


@pytest.mark.parametrize(
    ("arch", "fields"),
    [
        ("qwen2", QWEN_05B),
        ("llama", LLAMA_8B),
        ("llama", {**TINY, "vocab_size": 49152, "tie_word_embeddings": True}),
        ("qwen2", {**TINY, "vocab_size": 49152, "tie_word_embeddings": False}),
        ("llama", {**TINY, "vocab_size": 1000, "attention_bias": True, "mlp_bias": True, "head_dim": 32}),
    ],
)
def test_counts_match_the_module_tree_transformers_builds(arch, fields):
    """A config object (not only a dict) is read, and every count equals the real module tree's."""
    cfg = _config(arch, **fields)
    model = _meta_model(cfg)
    shape = ModelShape.from_config(cfg)
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert shape.lora_parameters(8) == count_lora_params(model, list(PROJECTIONS), 8)
    assert shape.lora_parameters(4, ("q_proj", "v_proj")) == count_lora_params(model, ["q_proj", "v_proj"], 4)


@pytest.mark.parametrize("n", [2, -1])
def test_freeze_trains_what_the_trainer_trains(n):
    """Freeze tuning's trained parameters are those of LLaMA-Factory's rule (the trainer's freeze_plan)."""
    cfg = LlamaConfig(**{**TINY, "num_hidden_layers": 4}, vocab_size=1000)
    model = _meta_model(cfg)
    fragments = freeze_plan(model, MethodConfig(finetuning_type="freeze", freeze_trainable_layers=n))
    trained = sum(p.numel() for name, p in model.named_parameters() if any(f in f".{name}" for f in fragments))
    shape = ModelShape.from_config(cfg)
    plan = plan_memory(shape, MemoryInputs(method="freeze", freeze_trainable_layers=n))
    assert plan.breakdown["trainable_weights"] == 4 * trained  # float32


def test_more_tokens_need_more_memory(qwen, llama):
    for shape in (qwen, llama):
        base = MemoryInputs(micro_batch=2, seq_len=512)
        for bigger in (base.with_(micro_batch=4), base.with_(seq_len=1024)):
            for gc in (False, True):
                assert (
                    plan_memory(shape, bigger.with_(gradient_checkpointing=gc)).total
                    > plan_memory(shape, base.with_(gradient_checkpointing=gc)).total
                )


def test_checkpointing_needs_less(qwen, llama):
    for shape in (qwen, llama):
        for method in ("lora", "qlora", "full", "freeze"):
            x = MemoryInputs(method=method, micro_batch=4, seq_len=1024, freeze_trainable_layers=-2)
            gc, no_gc = plan_memory(shape, x.with_(gradient_checkpointing=True)), plan_memory(shape, x)
            assert gc.total <= no_gc.total
            if no_gc.peak_phase == "backward start":  # not when the optimizer step peaks (full 8B)
                assert gc.total < no_gc.total


def test_qlora_below_lora_below_full(llama, qwen):
    x = MemoryInputs(micro_batch=2, seq_len=1024, gradient_checkpointing=True)
    qlora, lora, full = (plan_memory(llama, x.with_(method=m)).total for m in ("qlora", "lora", "full"))
    assert qlora < lora < full
    # a 0.5B model is mostly embedding: 4 bits save little, and peft keeps the embedding in fp32
    qlora, lora, full = (plan_memory(qwen, x.with_(method=m)).total for m in ("qlora", "lora", "full"))
    assert lora < full and qlora < full
    assert qlora == pytest.approx(lora, rel=0.1)


def test_zero3_shards_full_fine_tuning(llama):
    x = MemoryInputs(method="full", micro_batch=1, seq_len=1024, gradient_checkpointing=True)
    plain = plan_memory(llama, x)
    one, two = (plan_memory(llama, x.with_(zero_stage=3, n_gpus=n)) for n in (1, 2))
    assert two.total < plain.total

    def states(plan):
        return sum(plan.breakdown[k] for k in ("weights", "trainable_weights", "gradients", "optimizer"))

    assert states(two) / states(one) == pytest.approx(0.5, abs=0.05)  # + the gathered layers and buckets
    assert 16 <= states(one) / llama.parameters <= 24  # bf16 weights + grads, fp32 master + Adam (+ the step's)
    offload = plan_memory(llama, x.with_(zero_stage=3, offload_optimizer=True, offload_param=True))
    assert offload.breakdown["optimizer"] == 0
    assert offload.total < two.total


def test_sanity_against_h100_measurements(qwen, llama):
    """Measured peaks (torch.cuda.max_memory_allocated) of our trainer: a sanity band, not a fit."""
    cases = [
        (llama, MemoryInputs(micro_batch=4, seq_len=2048), 90.7),
        (llama, MemoryInputs(micro_batch=4, seq_len=1024, gradient_checkpointing=True), 22.19),
        (llama, MemoryInputs(method="qlora", micro_batch=4, seq_len=1024, gradient_checkpointing=True), 16.49),
        (qwen, MemoryInputs(micro_batch=16, seq_len=1024), 61.9),
    ]
    for shape, x, measured in cases:
        assert plan_memory(shape, x).allocated / GIB == pytest.approx(measured, rel=0.2), x.describe()


def test_8b_lora_long_rows_suggest_checkpointing_first(llama):
    x = MemoryInputs(micro_batch=4, seq_len=2048)
    assert not plan_memory(llama, x).fits(GPU_80)
    assert checkpointed_layers_needed(llama, x, GPU_80) > 0
    changes = suggest(llama, x, GPU_80)
    change, plan = changes[0]
    assert change == "gradient_checkpointing: true"
    assert plan.inputs.gradient_checkpointing and plan.fits(GPU_80)
    assert all(p.fits(GPU_80) for _, p in changes)
    smaller = [c for c, p in changes if p.inputs.micro_batch < 4]
    assert smaller == ["per_device_train_batch_size: 2, gradient_accumulation_steps: 2"]


def test_full_8b_on_one_gpu_suggests_zero3_or_offload(llama):
    x = MemoryInputs(method="full", micro_batch=4, seq_len=1024)
    changes = suggest(llama, x, GPU_80)
    assert changes and all(p.fits(GPU_80) for _, p in changes)
    assert all("deepspeed: ds_z3" in c for c, _ in changes), changes
    assert any(p.inputs.n_gpus > 1 for _, p in changes)
    assert any(p.inputs.offload_param for _, p in changes)


def test_a_run_that_fits_needs_no_change(qwen):
    x = MemoryInputs(micro_batch=2, seq_len=512)
    assert plan_memory(qwen, x).fits(GPU_80)
    assert suggest(qwen, x, GPU_80) == []
    assert checkpointed_layers_needed(qwen, x, GPU_80) == 0


def test_smaller_batch_keeps_the_global_batch(qwen):
    x = MemoryInputs(micro_batch=64, seq_len=2048, gradient_accumulation_steps=2)
    for _, plan in suggest(qwen, x, GPU_80):
        assert plan.inputs.micro_batch * plan.inputs.gradient_accumulation_steps == 128


def test_render_names_every_part(llama):
    plan = plan_memory(llama, MemoryInputs(method="qlora", micro_batch=4, seq_len=1024))
    text = plan.render()
    for part in (*PARTS, "total", "per GPU", plan.peak_phase):
        assert part in text
    assert f"{plan.gib:.2f}" in text
    assert set(plan.breakdown) == set(PARTS)
    assert plan.total == sum(plan.breakdown.values()) > plan.allocated
    assert "GiB per GPU" in repr(plan) and "\n" not in repr(plan)
    assert plan.to_dict()["total_gib"] == pytest.approx(plan.gib, abs=1e-3)


def test_bad_inputs_list_every_problem():
    with pytest.raises(ConfigError) as err:
        MemoryInputs(method="lora", micro_batch=0, lora_target=("q", "v_proj"), zero_stage=1, offload_param=True)
    text = str(err.value)
    assert "micro_batch" in text and "lora_target" in text and "offload_param" in text
    with pytest.raises(ValueError, match="quantization_bit"):
        MemoryInputs(method="qlora", quantization_bit=None)
    assert MemoryInputs(method="full", quantization_bit=None).quantization_bit is None
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelShape.from_config({"model_type": "llama"})


def test_inputs_are_frozen():
    x = MemoryInputs()
    with pytest.raises(dataclasses.FrozenInstanceError):
        x.micro_batch = 2  # type: ignore[misc]
    assert x.with_(micro_batch=2).micro_batch == 2 and x.micro_batch == 1


def test_visible_gpu_bytes_is_a_list():
    gpus = visible_gpu_bytes()
    assert isinstance(gpus, list)
    assert len(gpus) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
