"""GPU path of the training methods: QLoRA (4/8-bit) training and its 16-bit merge, DPO, freeze and full tuning.

Tiny random models (tests/conftest.py) and the demo data; bf16 mixed precision on CUDA. Skipped
without a GPU; the QLoRA tests also without bitsandbytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Where and how the tests train; module constants so the same bodies can be driven elsewhere.
DEVICE = "cuda"
BF16 = True
WEIGHTS_DTYPE = torch.bfloat16


def _trainer(model_dir: Path, out: Path, **training):
    from finetune_kit import LoraTrainer, ModelSource

    settings = dict(
        output_dir=str(out),
        learning_rate=5e-3,
        max_steps=30,
        bf16=BF16,
        per_device_train_batch_size=8,
        lr_scheduler_type="constant",
        logging_steps=5,
        save_steps=1000,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(training)
    source = ModelSource.local(model_dir).with_config(template="chatml")
    return LoraTrainer(source).with_data(cutoff_len=128).with_training(**settings)


def _losses(result) -> list[float]:
    losses = [loss for _, loss in result.losses]
    assert losses and all(math.isfinite(x) for x in losses), losses
    return losses


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _safetensors_dtypes(folder: Path) -> set[str]:
    from safetensors import safe_open

    dtypes = set()
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(f, framework="pt") as st:
            dtypes.update(st.get_slice(k).get_dtype() for k in st.keys())
    return dtypes


@pytest.fixture(scope="module")
def bnb():
    """bitsandbytes, with the GPU and bf16 the QLoRA tests need."""
    from finetune_kit import Environment

    Environment.detect().require(gpu=True, bf16=True)
    return pytest.importorskip("bitsandbytes")


def test_qlora_4bit_trains_on_quantized_weights_and_merges_into_a_16_bit_model(bnb, tiny_llama_dir, tmp_path):
    from finetune_kit import DatasetRegistry, Exporter, ModelSource
    from finetune_kit.models.quantize import is_quantized

    data = DatasetRegistry.demo().load("shop_alpaca")
    trainer = _trainer(tiny_llama_dir, tmp_path / "out").with_lora(lora_rank=8).with_quantization(quantization_bit=4)
    plan = trainer.load_plan()
    assert plan is not None and plan.quantization_bit == 4 and plan.dtype == "bfloat16"
    assert plan.quantization_type == "nf4" and plan.double_quantization
    result = trainer.train(data)

    tuned = result.load()
    assert is_quantized(tuned.model)
    linear4 = [m for m in tuned.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 2 * 7  # every linear layer of both hidden layers; the head stays unquantized
    assert tuned.device.type == "cuda"
    losses = _losses(result)
    assert losses[-1] < losses[0], losses
    lora_b = [p for n, p in tuned.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.dtype == torch.float32 for p in lora_b)
    assert any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it trained

    exported = Exporter(result).with_config(export_device="auto").merge(tmp_path / "merged")
    config = json.loads((exported.export_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert _safetensors_dtypes(exported.export_dir) <= {"BF16", "F16"}, _safetensors_dtypes(exported.export_dir)
    names = set(_tensors(exported.export_dir))
    assert not any("lora_" in n or "absmax" in n or "quant" in n for n in names)

    # the merged 16-bit model computes what base + adapter compute on the unquantized bf16 base
    reference = result.load(quantization_bit=None, infer_dtype="bfloat16")
    assert not is_quantized(reference.model) and reference.dtype == torch.bfloat16
    merged = ModelSource.local(exported.export_dir).load(infer_dtype="bfloat16")
    assert not is_quantized(merged.model)
    ids = reference.encode_prompt("你们是什么店？")
    with torch.no_grad():
        a = reference.model(input_ids=torch.tensor([ids], device=reference.device)).logits.float()
        b = merged.model(input_ids=torch.tensor([ids], device=merged.device)).logits.float().to(a.device)
    torch.testing.assert_close(b, a, atol=5e-2, rtol=5e-2)  # bf16 weights: merged rounding differs slightly


def test_qlora_8bit_trains(bnb, tiny_llama_dir, tmp_path):
    from finetune_kit import DatasetRegistry
    from finetune_kit.models.quantize import is_quantized

    data = DatasetRegistry.demo().load("shop_alpaca")
    trainer = _trainer(tiny_llama_dir, tmp_path / "out").with_lora(lora_rank=8).with_quantization(quantization_bit=8)
    assert trainer.load_plan().quantization_bit == 8
    result = trainer.train(data)
    tuned = result.load()
    assert is_quantized(tuned.model)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in tuned.model.modules())
    losses = _losses(result)
    assert losses[-1] < losses[0], losses
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_dpo_loss_falls_on_gpu_in_bf16(tiny_llama_dir, tmp_path):
    from finetune_kit import DatasetRegistry, Environment

    if BF16:
        Environment.detect().require(gpu=True, bf16=True)
    data = DatasetRegistry.demo().load("shop_dpo", stage="dpo")
    trainer = (
        _trainer(tiny_llama_dir, tmp_path / "out", max_steps=8, logging_steps=1, learning_rate=1e-2)
        .with_lora(lora_rank=8)
        .with_dpo(pref_beta=0.1)
    )
    result = trainer.train(data)
    tuned = result.load()
    assert tuned.device.type == DEVICE.split(":")[0]
    assert next(p for n, p in tuned.model.named_parameters() if "lora_" not in n).dtype == WEIGHTS_DTYPE
    assert set(tuned.model.peft_config) == {"default"}  # the reference is the base with the adapter off: no copy
    losses = _losses(result)
    assert len(losses) == 8
    assert losses[0] == pytest.approx(math.log(2), abs=1e-2)  # B = 0 at the start: policy == reference
    assert sum(losses[-3:]) / 3 < losses[0] - 0.02, losses
    margins = [e["rewards/margins"] for e in result.log_history if "rewards/margins" in e]
    assert margins[-1] > 0, margins


def test_freeze_on_gpu_trains_exactly_the_last_layer_in_float32(tiny_llama_dir, tmp_path):
    from finetune_kit import DatasetRegistry

    data = DatasetRegistry.demo().load("shop_alpaca")
    trainer = _trainer(tiny_llama_dir, tmp_path / "out", max_steps=8, logging_steps=2, learning_rate=1e-3).with_freeze(
        freeze_trainable_layers=1
    )
    result = trainer.train(data)
    _losses(result)
    trained = lambda name: ".layers.1." in f".{name}"  # the last of the 2 hidden layers
    model = result.load().model
    assert model.device.type == DEVICE.split(":")[0]
    for name, p in model.named_parameters():
        assert p.requires_grad == trained(name), name
        assert p.dtype == (torch.float32 if trained(name) else WEIGHTS_DTYPE), (name, p.dtype)

    base, saved = _tensors(tiny_llama_dir), _tensors(result.output_dir)
    assert set(saved) == set(base)
    # the loaded base is the file's weights rounded to WEIGHTS_DTYPE; training copies those to float32
    changed = {n for n in base if not torch.equal(saved[n].float(), base[n].to(WEIGHTS_DTYPE).float())}
    assert changed == {n for n in base if trained(n)}
    assert all(saved[n].dtype == torch.float32 for n in changed)  # saved from the float32 training copies


def test_full_on_gpu_trains_every_weight_in_float32(tiny_llama_dir, tmp_path):
    from finetune_kit import DatasetRegistry

    data = DatasetRegistry.demo().load("shop_alpaca")
    result = (
        _trainer(tiny_llama_dir, tmp_path / "out", max_steps=8, logging_steps=2, learning_rate=1e-3)
        .with_full()
        .train(data)
    )
    losses = _losses(result)
    assert losses[-1] < losses[0], losses
    model = result.load().model
    assert model.device.type == DEVICE.split(":")[0]
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())

    base, saved = _tensors(tiny_llama_dir), _tensors(result.output_dir)
    assert set(saved) == set(base)
    unchanged = [n for n in base if torch.equal(saved[n].float(), base[n].to(WEIGHTS_DTYPE).float())]
    assert not unchanged, unchanged
    reloaded = result.load(infer_dtype="float32")  # the saved folder is a whole model that loads on its own
    assert reloaded.model is not model and sum(p.numel() for p in reloaded.model.parameters()) == sum(
        p.numel() for p in model.parameters()
    )
