"""Shared fixtures: tiny random-weight models with the bundled model's real tokenizer.

Fast tests use 2-layer, hidden-64 Llama and Qwen2 models built here; tests marked ``slow``
use the real bundled SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    """The converted bundled checkpoint (config, safetensors, tokenizer); converted once per cache."""
    from finetune_kit.models.source import ModelSource

    return ModelSource.bundled().resolve()


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """SmolLM2's real tokenizer: from $FINETUNE_KIT_TEST_TOKENIZER if set (GPU runs), else the bundled model."""
    env = os.environ.get("FINETUNE_KIT_TEST_TOKENIZER")
    if env:
        return Path(env)
    from finetune_kit.models.source import ModelSource

    return ModelSource.bundled().resolve()


def _tiny(tmp: Path, bundled: Path, arch: str) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(bundled)
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    out = tmp / f"tiny-{arch}"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A 2-layer, hidden-64 Llama with random weights and SmolLM2's tokenizer, saved to disk."""
    return _tiny(tmp_path_factory.mktemp("models"), tokenizer_dir, "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A 2-layer, hidden-64 Qwen2 with random weights and SmolLM2's tokenizer, saved to disk."""
    return _tiny(tmp_path_factory.mktemp("models"), tokenizer_dir, "qwen2")


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir: Path):
    """The tiny Llama loaded as a :class:`LoadedModel` with the chatml template."""
    from finetune_kit.models.source import ModelSource

    return ModelSource.local(tiny_llama_dir).load(template="chatml", infer_dtype="float32")


@pytest.fixture(scope="session")
def bundled_model():
    """The real bundled SmolLM2-135M-Instruct (for slow tests)."""
    from finetune_kit.models.source import ModelSource

    return ModelSource.bundled().load()


# An LLaMA-Factory LoRA SFT YAML as users write it (the one of the foundation acceptance check).
_LF_YAML = """\
### model
model_name_or_path: bundled:smollm2-135m-instruct
trust_remote_code: true
### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_alpha: 16
lora_dropout: 0
lora_target: all
### dataset
dataset: shop
dataset_dir: {data}
template: chatml
cutoff_len: 256
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 1
### output
output_dir: {out}
logging_steps: 2
save_steps: 1000
plot_loss: true
overwrite_output_dir: true
### train
per_device_train_batch_size: 4
gradient_accumulation_steps: 1
learning_rate: {learning_rate}
num_train_epochs: {num_train_epochs}
lr_scheduler_type: constant
warmup_ratio: 0.0
report_to: none
seed: 0
"""


@pytest.fixture(scope="session")
def lf_yaml():
    """Render the LLaMA-Factory-style training YAML for a dataset folder and an output folder."""

    def render(data: Path, out: Path, learning_rate: str = "1.0e-3", num_train_epochs: str = "10.0") -> str:
        return _LF_YAML.format(data=data, out=out, learning_rate=learning_rate, num_train_epochs=num_train_epochs)

    return render
