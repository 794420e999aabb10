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


def write_rows(folder: Path, n: int = 32) -> Path:
    rows = [{"instruction": f"问题 {i}", "input": "", "output": f"回答 {i} 号"} for i in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "t.json").write_text(json.dumps(rows, ensure_ascii=False))
    (folder / "dataset_info.json").write_text(json.dumps({"t": {"file_name": "t.json"}}))
    return folder


def test_trainer_loads_a_source_straight_onto_the_gpu_in_bf16(tiny_qwen2_dir: Path, tmp_path: Path):
    from finetune_kit import DatasetRegistry, LoraTrainer, ModelSource

    data = DatasetRegistry.from_dir(write_rows(tmp_path / "d")).load("t")
    trainer = (
        LoraTrainer(ModelSource.local(tiny_qwen2_dir).with_config(template="qwen"))
        .with_data(cutoff_len=64)
        .with_training(
            output_dir=tmp_path / "out",
            learning_rate=5e-3,
            max_steps=20,
            bf16=True,
            per_device_train_batch_size=8,
            save_steps=1000,
            disable_tqdm=True,
            logging_steps=5,
        )
    )
    plan = trainer.load_plan()
    assert plan is not None and plan.dtype == "bfloat16" and plan.device.startswith("cuda")
    assert plan.from_pretrained_kwargs()["device_map"] == {"": plan.device}
    result = trainer.train(data)
    tuned = result.load()
    assert tuned is result.model and tuned.device.type == "cuda"
    assert next(p for n, p in tuned.model.named_parameters() if "lora_" not in n).dtype == torch.bfloat16
    losses = [loss for _, loss in result.losses]
    assert losses[-1] < losses[0]


DDP_SCRIPT = """
import json, os, sys, torch
from finetune_kit import DatasetRegistry, LoraTrainer, ModelSource
model_dir, data_dir, out = sys.argv[1:4]
rank = int(os.environ["LOCAL_RANK"])
data = DatasetRegistry.from_dir(data_dir).load("t")
trainer = (LoraTrainer(ModelSource.local(model_dir).with_config(template="qwen")).with_data(cutoff_len=64)
           .with_training(output_dir=out, learning_rate=5e-3, max_steps=12, bf16=True, per_device_train_batch_size=4,
                          save_steps=1000, disable_tqdm=True, logging_steps=4))
result = trainer.train(data)
others = [i for i in range(torch.cuda.device_count()) if i != rank]
report = {"rank": rank, "device": str(result.load().device),
          "bytes_on_other_gpus": sum(torch.cuda.memory_allocated(i) for i in others),
          "losses": [loss for _, loss in result.losses]}
print("REPORT " + json.dumps(report), flush=True)
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_python_trainer_under_torchrun_puts_each_rank_on_its_own_gpu(tiny_qwen2_dir: Path, tmp_path: Path):
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    data = write_rows(tmp_path / "d")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(script),
        str(tiny_qwen2_dir),
        str(data),
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads(line.split("REPORT ", 1)[1]) for line in proc.stdout.splitlines() if "REPORT " in line]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for r in reports:
        assert r["device"] == f"cuda:{r['rank']}"
        assert r["bytes_on_other_gpus"] == 0, r  # no rank loads its copy onto another rank's GPU
        assert r["losses"][-1] < r["losses"][0]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cli_under_torchrun_trains_on_two_gpus_and_only_rank_0_prints(tiny_qwen2_dir: Path, tmp_path: Path):
    import os
    import subprocess
    import sys

    data = write_rows(tmp_path / "d")
    out = tmp_path / "out"
    keys = [
        f"model_name_or_path={tiny_qwen2_dir}",
        "template=qwen",
        "do_train=true",
        "dataset=t",
        f"dataset_dir={data}",
        "cutoff_len=64",
        f"output_dir={out}",
        "bf16=true",
        "max_steps=8",
        "per_device_train_batch_size=4",
        "logging_steps=2",
        "save_steps=1000",
        "disable_tqdm=true",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "finetune_kit.cli.main",
        "train",
        *keys,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("Training finished:") == 1, proc.stdout[-3000:]
    assert proc.stdout.count("trainable params:") == 1
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["current_steps"] for r in log if "loss" in r] == [2, 4, 6, 8]  # one writer, no duplicated lines


def gpu_llama(examples: tuple[tuple[int, int], ...]) -> tuple[torch.nn.Module, list[dict]]:
    """A random 2-layer, hidden-256 Llama (grouped-query heads) in bf16 on the GPU, and one row per
    ``(length, prompt length)`` of random tokens, its prompt unlabelled."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    rows = []
    for length, prompt in examples:
        ids = torch.randint(1, 512, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return model, rows


def test_padding_free_varlen_attention_equals_padded_sdpa_on_gpu():
    """One padding-free row through PyTorch's varlen flash kernel (grouped-query heads) gives the padded SDPA
    batch's loss, gradients and per-example logits, in bf16."""
    from finetune_kit.data.packed import VarlenCollator
    from finetune_kit.models.varlen import padding_free, varlen_training

    model, rows = gpu_llama(((37, 5), (200, 60), (3, 0), (129, 1), (64, 64 - 9)))
    width = max(len(r["input_ids"]) for r in rows)
    padded = {
        "input_ids": torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]),
        "labels": torch.tensor([r["labels"] + [-100] * (width - len(r["input_ids"])) for r in rows]),
    }

    def step(batch):
        model.zero_grad(set_to_none=True)
        out = model(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()})
        out.loss.backward()
        return out, {n: p.grad.float().clone() for n, p in model.named_parameters()}

    assert padding_free(model, True) is True
    ref, ref_grads = step(padded)
    with varlen_training(model) as used:
        assert used and model.config._attn_implementation == "finetune_kit_varlen"
        flat, grads = step(VarlenCollator()(rows))
    assert model.config._attn_implementation == "sdpa"  # as it was before training
    torch.testing.assert_close(flat.loss.float(), ref.loss.float(), rtol=2e-3, atol=2e-3)
    for name, want in ref_grads.items():
        cos = torch.nn.functional.cosine_similarity(grads[name].flatten(), want.flatten(), dim=0)
        assert cos > 0.995, (name, float(cos))
    start = 0
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        got, want = flat.logits[0, start : start + n].float(), ref.logits[i, :n].float()
        assert (got - want).abs().max() < 0.1, (i, float((got - want).abs().max()))
        start += n


def train_logs(model_dir: Path, tmp_path: Path, settings: dict, steps: int) -> dict:
    """A bf16 LoRA run of ``steps`` on the tiny Qwen2 per name in ``settings`` (its training keys): the logged steps."""
    from finetune_kit import DatasetRegistry, LoraTrainer, ModelSource

    data = DatasetRegistry.from_dir(write_rows(tmp_path / "d")).load("t")
    model = ModelSource.local(model_dir).load(template="qwen")
    logs = {}
    for name, extra in settings.items():
        result = (
            LoraTrainer(model)
            .with_lora(lora_rank=8)
            .with_data(cutoff_len=64)
            .with_training(
                output_dir=str(tmp_path / f"out-{name}"),
                max_steps=steps,
                bf16=True,
                per_device_train_batch_size=8,
                logging_steps=1,
                save_strategy="no",
                disable_tqdm=True,
                **extra,
            )  # fmt: skip
        ).train(data)
        logs[name] = [e for e in result.log_history if "loss" in e and "step" in e]
    return logs


def test_lora_trainer_trains_padding_free_by_default_on_gpu(tiny_qwen2_dir: Path, tmp_path: Path):
    """finetune_kit's default on a GPU: the same first-step loss and gradient norm as padded batches."""
    logs = train_logs(tiny_qwen2_dir, tmp_path, {"auto": {}, "padded": {"padding_free": False}}, steps=2)
    assert logs["auto"][0]["loss"] == pytest.approx(logs["padded"][0]["loss"], rel=1e-2)
    assert logs["auto"][0]["grad_norm"] == pytest.approx(logs["padded"][0]["grad_norm"], rel=5e-2)


def test_fused_lora_and_compiled_layers_keep_the_numbers_on_gpu():
    """LoRA added with one addmm, and the decoder layers compiled, over a padding-free row in bf16 autocast:
    the loss and adapter gradients of PEFT's own forward."""
    from peft import LoraConfig, get_peft_model

    from finetune_kit.data.packed import VarlenCollator
    from finetune_kit.models.varlen import varlen_training
    from finetune_kit.train.speed import compiled_layers, fused_lora, no_input_casts

    base, rows = gpu_llama(((37, 5), (200, 60), (3, 0), (129, 1)))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in VarlenCollator()(rows).items()}

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        return loss.float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    with varlen_training(model):
        want_loss, want = step()
        with no_input_casts(model, mixed_precision=True), fused_lora(model) as fused:
            assert fused == 14
            runs = [step()]
            with compiled_layers(model, enabled=True):
                runs += [step(), step()]  # the second call runs the compiled graph as compiled
    for loss, grads in runs:
        torch.testing.assert_close(loss, want_loss, rtol=2e-3, atol=2e-3)
        assert grads.keys() == want.keys() and len(want) == 28
        for name, w in want.items():
            cos = torch.nn.functional.cosine_similarity(grads[name].flatten(), w.flatten(), dim=0)
            assert cos > 0.995, (name, float(cos))


def test_lora_trainer_with_compiled_layers_and_selective_checkpointing_on_gpu(tiny_qwen2_dir: Path, tmp_path: Path):
    """torch_compile and gradient_checkpointing_layers through LoraTrainer: the first steps' losses of a plain run."""
    settings = {
        "plain": {"gradient_checkpointing": False, "torch_compile": False},
        "tuned": {"torch_compile": True, "gradient_checkpointing": True, "gradient_checkpointing_layers": 1},
    }
    logs = train_logs(tiny_qwen2_dir, tmp_path, settings, steps=3)
    assert [e["loss"] for e in logs["tuned"]] == pytest.approx([e["loss"] for e in logs["plain"]], rel=2e-2)
