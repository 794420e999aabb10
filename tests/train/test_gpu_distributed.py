"""Several CUDA GPUs: the self-launched CLI on 2 GPUs matches 1 GPU (fp32), and DeepSpeed ZeRO-2/3
train LoRA and full fine-tuning and leave a loadable output_dir. Skipped with fewer than 2 GPUs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "finetune_kit" / "data" / "demo"


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


needs_two = pytest.mark.skipif(_gpus() < 2, reason="needs 2 CUDA GPUs")
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")


def _train(tiny_llama_dir: Path, out: Path, gpus: int, *extra: str) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(CUDA_VISIBLE_DEVICES=",".join(map(str, range(gpus))), HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "finetune_kit.cli.main", "train", "--do_train", "true"]
    cmd += ["--model_name_or_path", str(tiny_llama_dir), "--template", "smollm2", "--dataset", "shop_alpaca"]
    cmd += ["--dataset_dir", str(DEMO), "--cutoff_len", "64", "--max_samples", "64", "--lora_target", "all"]
    cmd += ["--lora_dropout", "0", "--learning_rate", "1e-2", "--max_steps", "4", "--logging_steps", "1"]
    cmd += ["--lr_scheduler_type", "constant", "--seed", "0", "--output_dir", str(out), "--disable_tqdm", "true"]
    done = subprocess.run([*cmd, *extra], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@needs_two
def test_two_gpus_match_one(tiny_llama_dir: Path, tmp_path: Path):
    one = _train(tiny_llama_dir, tmp_path / "one", 1, "--per_device_train_batch_size", "4")
    two = _train(tiny_llama_dir, tmp_path / "two", 2, "--per_device_train_batch_size", "2")
    assert two == pytest.approx(one, rel=1e-4, abs=1e-4)
    peak = json.loads((tmp_path / "two" / "train_results.json").read_text())["peak_gpu_memory_gib"]
    assert 0 < peak < 5


@needs_two
@needs_deepspeed
@pytest.mark.parametrize("config", ["ds_z2", "ds_z3"])
@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_deepspeed_trains_and_saves_a_loadable_model(tiny_llama_dir: Path, tmp_path: Path, config, finetuning):
    from finetune_kit import TrainResult

    out = tmp_path / f"{config}-{finetuning}"
    extra = ["--per_device_train_batch_size", "2", "--deepspeed", config, "--finetuning_type", finetuning]
    losses = _train(tiny_llama_dir, out, 2, *extra)
    assert len(losses) == 4 and all(loss == loss for loss in losses)  # finite
    model = TrainResult.from_dir(out).load()
    assert isinstance(model.chat("Hello", max_new_tokens=2), str)
