"""Exporter: merged weights give the same logits as base + adapter, and nothing the user had is lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune_kit import Exporter, LoraTrainer, OutputExistsError, TrainResult


def trained(model, tmp_path: Path) -> TrainResult:
    from finetune_kit import DatasetRegistry

    rows = [{"instruction": f"question {i}", "input": "", "output": f"answer number {i}"} for i in range(4)]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "t.json").write_text(json.dumps(rows))
    (tmp_path / "d" / "dataset_info.json").write_text(json.dumps({"t": {"file_name": "t.json"}}))
    data = DatasetRegistry.from_dir(tmp_path / "d").load("t")
    return (
        LoraTrainer(model)
        .with_lora(lora_rank=4)
        .with_data(cutoff_len=64)
        .with_training(
            output_dir=str(tmp_path / "lora"),
            learning_rate=5e-2,
            max_steps=3,
            per_device_train_batch_size=4,
            save_steps=1000,
            disable_tqdm=True,
        )
    ).train(data)


def logits(model, text: str) -> torch.Tensor:
    ids = torch.tensor([model.tokenizer.encode(text, add_special_tokens=False)], device=model.device)
    with torch.no_grad():
        return model.model(input_ids=ids).logits.float().cpu()


def test_merged_logits_equal_adapter_logits(tiny_llama, tmp_path):
    result = trained(tiny_llama, tmp_path)
    adapter_model = result.load()
    exported = Exporter(result).with_config(export_size=1).merge(tmp_path / "merged")
    merged = exported.load()
    prompt = adapter_model.template.prompt([{"role": "user", "content": "question 1"}], adapter_model.tokenizer)
    a, b, base = logits(adapter_model, prompt), logits(merged, prompt), logits(tiny_llama, prompt)
    assert not torch.allclose(a, base, atol=1e-3), "the adapter must change the logits for this test to mean anything"
    # fp32 on the CPU: equal to 1e-4. CUDA matmul kernels sum in another order, so allow a little more there.
    torch.testing.assert_close(b, a, atol=1e-4 if adapter_model.device.type == "cpu" else 5e-3, rtol=0)


def test_export_folder_loads_with_plain_transformers_and_keeps_the_template(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = trained(tiny_llama, tmp_path)
    out = Exporter(result).merge(tmp_path / "merged").export_dir
    tok = AutoTokenizer.from_pretrained(out)
    AutoModelForCausalLM.from_pretrained(out)
    msgs = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # chatml, as trained
    assert tok.eos_token == "<|im_end|>"
    gen = json.loads((out / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos
    info = json.loads((out / "finetune_kit_export.json").read_text())
    assert info["template"] == "chatml" and info["adapters"] == [str(result.output_dir)]


def test_small_export_size_shards_the_weights(tiny_llama, tmp_path):
    import os

    from finetune_kit.export._write import write_export

    big_enough = tiny_llama  # 2-layer model: ~13 MB in fp32, so 1 GB gives one shard
    out = write_export(big_enough, tiny_llama.model, tmp_path / "one", shard_gb=1, legacy=False, info={})
    assert [f for f in out.files if f.endswith(".safetensors")] == ["model.safetensors"]
    assert os.path.getsize(out.export_dir / "model.safetensors") > 1_000_000


def test_refuses_a_folder_that_is_not_an_export(tiny_llama, tmp_path):
    result = trained(tiny_llama, tmp_path)
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.txt").write_text("do not lose me")
    with pytest.raises(OutputExistsError, match="overwrite_export_dir"):
        Exporter(result).merge(target)
    assert (target / "thesis.txt").read_text() == "do not lose me"
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_re_export_replaces_an_earlier_export(tiny_llama, tmp_path):
    result = trained(tiny_llama, tmp_path)
    first = Exporter(result).merge(tmp_path / "m")
    second = Exporter(result).merge(tmp_path / "m")
    assert first.export_dir == second.export_dir and (second.export_dir / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]


def test_export_needs_a_directory(tiny_llama, tmp_path):
    from finetune_kit.errors import ConfigError

    result = trained(tiny_llama, tmp_path)
    with pytest.raises(ConfigError, match="export_dir is required"):
        Exporter(result).merge()


def test_a_gptq_base_is_refused_before_loading_with_what_to_do(tiny_llama_dir, tmp_path):
    import shutil

    from finetune_kit import ConfigError, ModelSource

    base = tmp_path / "gptq-base"
    shutil.copytree(tiny_llama_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"GPTQ-quantized.*merge into the 16-bit model"):
        Exporter(ModelSource.local(base).with_config(adapter_name_or_path=("saves/x",))).merge(tmp_path / "out")
    assert not (tmp_path / "out").exists()
