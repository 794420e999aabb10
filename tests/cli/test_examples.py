"""Every YAML under ``examples/`` runs through the real ``finetune-kit train`` entry point.

Each example runs as shipped, from the repository root (its ``dataset_dir`` is relative to it),
with a few overrides that make it quick on a CPU: a few steps and rows, a short cutoff, and the
tiny random model in place of the bundled one (its tokenizer is SmolLM2's, so the examples'
``template: smollm2`` applies unchanged). The QLoRA and ZeRO-3 examples need CUDA: on a CPU machine
they must stop with exit status 1 before any data is read; on GPUs they train.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from finetune_kit.cli.main import main
from finetune_kit.data.registry import DatasetRegistry

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
YAMLS = sorted(EXAMPLES.rglob("*.yaml"))
QLORA = EXAMPLES / "train_qlora" / "shop_qlora_sft.yaml"
ZERO3 = EXAMPLES / "train_lora" / "shop_lora_sft_ds3.yaml"
GPU_ONLY = {QLORA: ("CUDA", "quantization_bit: 4"), ZERO3: ("CUDA", "deepspeed")}
EXPECTED = {
    "train_lora/shop_lora_sft.yaml": ("sft", "lora", None),
    "train_lora/shop_lora_pretrain.yaml": ("pt", "lora", None),
    "train_lora/shop_lora_dpo.yaml": ("dpo", "lora", "sigmoid"),
    "train_lora/shop_lora_kto.yaml": ("kto", "lora", None),
    "train_lora/shop_lora_orpo.yaml": ("dpo", "lora", "orpo"),
    "train_lora/shop_lora_simpo.yaml": ("dpo", "lora", "simpo"),
    "train_lora/shop_dora_sft.yaml": ("sft", "lora", None),
    "train_lora/shop_lora_sft_ds3.yaml": ("sft", "lora", None),
    "train_qlora/shop_qlora_sft.yaml": ("sft", "lora", None),
    "train_full/shop_full_sft.yaml": ("sft", "full", None),
    "train_freeze/shop_freeze_sft.yaml": ("sft", "freeze", None),
}
QUICK = (
    "max_steps=2",
    "max_samples=8",
    "cutoff_len=64",
    "gradient_accumulation_steps=1",
    "logging_steps=1",
    "save_steps=1000",
)


def name(path: Path) -> str:
    return path.relative_to(EXAMPLES).as_posix()


def keys(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture()
def at_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from the repository root (as the examples say), with the tokenized cache in a temporary folder."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("FINETUNE_KIT_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_the_examples_are_the_documented_set():
    assert sorted(name(p) for p in YAMLS) == sorted(EXPECTED)
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"`(train_\w+/[\w.]+\.yaml)`", readme))
    assert listed == set(EXPECTED), "examples/README.md must list every example YAML"


@pytest.mark.parametrize("path", YAMLS, ids=name)
def test_example_keeps_llamafactory_layout_and_the_bundled_model(path: Path):
    text = path.read_text(encoding="utf-8")
    sections = re.findall(r"^### (\w+)$", text, flags=re.M)
    assert sections[:5] == ["model", "method", "dataset", "output", "train"]
    cfg = keys(path)
    stage, finetuning_type, pref_loss = EXPECTED[name(path)]
    assert (cfg["stage"], cfg["finetuning_type"], cfg.get("pref_loss")) == (stage, finetuning_type, pref_loss)
    assert cfg["model_name_or_path"] == "bundled:smollm2-135m-instruct" and cfg["template"] == "smollm2"
    assert cfg["do_train"] is True and cfg["plot_loss"] is True and cfg["overwrite_output_dir"] is True
    assert cfg["output_dir"].startswith("saves/smollm2-135m/")
    # dataset_dir works from the repository root, and every dataset is registered for the example's stage
    registry = DatasetRegistry.from_dir(ROOT / cfg["dataset_dir"])
    assert set(str(cfg["dataset"]).split(",")) <= set(registry.names)
    assert "bf16: true" in text, "each example says how to turn bf16 on"


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("path", [p for p in YAMLS if p not in GPU_ONLY], ids=name)
def test_example_trains_through_the_cli(path: Path, at_root: Path, tiny_llama_dir: Path, capsys):
    out = at_root / "out"
    argv = ["train", str(path.relative_to(ROOT)), *QUICK, f"model_name_or_path={tiny_llama_dir}", f"output_dir={out}"]
    code = main(argv)
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    cfg = keys(path)
    if cfg["finetuning_type"] == "lora":
        assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
        adapter = json.loads((out / "adapter_config.json").read_text())
        assert adapter["r"] == cfg["lora_rank"] and adapter["use_dora"] == bool(cfg.get("use_dora"))
        assert "Adapter, tokenizer, config and logs" in printed.out
    else:
        assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
        assert not (out / "adapter_config.json").exists()
        assert "Model, tokenizer, config and logs" in printed.out
    losses = [row["loss"] for row in _log(out) if "loss" in row]
    assert len(losses) >= 1 and all(math.isfinite(loss) for loss in losses)
    assert _log(out)[-1]["current_steps"] == 2
    assert (out / "training_loss.png").is_file()  # plot_loss: true
    record = json.loads((out / "finetune_kit_config.json").read_text())
    method = record["config"]["method"]
    assert (method["stage"], method["finetuning_type"]) == (cfg["stage"], cfg["finetuning_type"])
    assert record["config"]["model"]["template"] == "smollm2"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-machine behaviour of the GPU-only examples")
@pytest.mark.parametrize("path", sorted(GPU_ONLY), ids=name)
def test_gpu_only_example_on_a_cpu_stops_before_reading_data(path: Path, at_root: Path, capsys, monkeypatch):
    read: list[str] = []
    for method in ("load", "stream"):
        real = getattr(DatasetRegistry, method)

        def spy(self, *args, _real=real, _method=method, **kwargs):
            read.append(_method)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(DatasetRegistry, method, spy)
    out = at_root / "out"
    code = main(["train", str(path.relative_to(ROOT)), f"output_dir={out}"])  # the example as shipped
    err = capsys.readouterr().err
    assert code == 1
    assert all(word in err for word in GPU_ONLY[path]) and "Fix:" in err
    assert read == [], "the data must not be read before the configuration is known to run"
    assert not out.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_example_trains_on_a_gpu(at_root: Path, tiny_llama_dir: Path, capsys):
    pytest.importorskip("bitsandbytes")
    out = at_root / "out"
    argv = ["train", str(QLORA.relative_to(ROOT)), *QUICK, "bf16=true"]
    code = main([*argv, f"model_name_or_path={tiny_llama_dir}", f"output_dir={out}"])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    losses = [row["loss"] for row in _log(out) if "loss" in row]
    assert losses and all(math.isfinite(loss) for loss in losses)
    record = json.loads((out / "finetune_kit_config.json").read_text())
    assert record["config"]["model"]["quantization_bit"] == 4


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_zero3_example_trains_on_two_gpus(at_root: Path, tiny_llama_dir: Path, capsys, monkeypatch):
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    out = at_root / "out"
    code = main(
        [
            "train",
            str(ZERO3.relative_to(ROOT)),
            *QUICK,
            "save_steps=2",
            f"model_name_or_path={tiny_llama_dir}",
            f"output_dir={out}",
        ]
    )
    assert code == 0, capsys.readouterr().err[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "checkpoint-2" / "finetune_kit_launch.json").read_text())["deepspeed_zero_stage"] == 3
