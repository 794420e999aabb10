"""GPU path: bf16 LoRA training placed by Accelerate, merge, and generation on CUDA (skipped without a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_lora_on_gpu_learns_and_merges(tiny_qwen2_dir: Path, tmp_path: Path):
    from finetune_kit import DatasetRegistry, Environment, Exporter, LoraTrainer, ModelSource

    env = Environment.detect().require(gpu=True, bf16=True)
    assert env.gpus[0].memory_gib > 1
    model = ModelSource.local(tiny_qwen2_dir).load(template="qwen")
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    rows = [{"instruction": f"问题 {i}", "input": "", "output": f"回答 {i} 号"} for i in range(16)]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "t.json").write_text(json.dumps(rows, ensure_ascii=False))
    (tmp_path / "d" / "dataset_info.json").write_text(json.dumps({"t": {"file_name": "t.json"}}))
    data = DatasetRegistry.from_dir(tmp_path / "d").load("t")
    result = (
        LoraTrainer(model)
        .with_lora(lora_rank=8)
        .with_data(cutoff_len=64)
        .with_training(
            output_dir=str(tmp_path / "out"),
            learning_rate=5e-3,
            max_steps=30,
            bf16=True,
            per_device_train_batch_size=8,
            logging_steps=5,
            save_steps=1000,
            disable_tqdm=True,
        )
    ).train(data)
    losses = [loss for _, loss in result.losses]
    assert all(loss == loss for loss in losses) and losses[-1] < losses[0]
    tuned = result.load()
    assert tuned.device.type == "cuda"
    reply = tuned.chat("问题 3", do_sample=False, max_new_tokens=8)
    assert isinstance(reply, str)
    merged = Exporter(result).with_config(export_device="auto").merge(tmp_path / "merged").load()
    prompt = tuned.encode_prompt("问题 3")
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        a = tuned.model(input_ids=ids).logits.float()
        b = merged.model(input_ids=ids).logits.float()
    torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)  # bf16 weights: merged rounding differs slightly
