"""How to load a model: LLaMA-Factory's model arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from finetune_kit.config.base import StageConfig, option


@dataclass(frozen=True, repr=False)
class ModelConfig(StageConfig):
    """Where the weights come from and how to load them (LLaMA-Factory key names)."""

    section = "model"

    model_name_or_path: str | None = option(
        None,
        "A local directory, a .gguf file, a Hugging Face id (org/name), 'modelscope:org/name', "
        "or 'bundled:smollm2-135m-instruct' (offline default).",
    )
    adapter_name_or_path: tuple[str, ...] | None = option(
        None,
        "LoRA adapter directories, comma separated; all are applied in order. For `api`, name=folder entries "
        "are served side by side instead, each as its own model.",
    )
    template: str | None = option(
        None, "Chat template name (chatml, qwen, llama3, smollm2, ...); none means the tokenizer's own."
    )
    default_system: str | None = option(None, "System prompt used when a conversation has none.")
    tool_format: str | None = option(
        None, "Tool-calling format (default, qwen, llama3, glm4, mistral); none means the template's own."
    )
    enable_thinking: bool = option(
        True,
        "Reasoning templates (qwen3): train an empty <think></think> when a reply has none (true), or put it "
        "in the prompt and drop every thought from replies (false).",
    )
    trust_remote_code: bool = option(False, "Allow model code from the hub (passed to transformers).")
    infer_dtype: Literal["auto", "float32", "float16", "bfloat16"] = option(
        "auto", "Weights dtype: auto keeps float32 on CPU and uses bf16 (or fp16) on a GPU."
    )
    model_revision: str = option("main", "Hub revision (branch, tag or commit).")
    cache_dir: str | None = option(None, "Where hub downloads are cached.")
    hf_hub_token: str | None = option(None, "Hugging Face token for gated models.")
    use_modelscope: bool = option(False, "Resolve hub ids on ModelScope (like USE_MODELSCOPE_HUB=1).")
    flash_attn: Literal["auto", "disabled", "sdpa", "fa2", "eager"] = option(
        "auto", "Attention kernel: auto (SDPA), sdpa, eager/disabled, or fa2 (needs flash-attn)."
    )
    device: Literal["auto", "cpu", "cuda"] = option(
        "auto",
        "Where the weights go at load time: auto = this process's GPU if there is one (LOCAL_RANK under a "
        "launcher), else the CPU.",
    )

    quantization_bit: int | None = option(
        None, "Load the base in 4 or 8 bits with bitsandbytes to train LoRA on it (QLoRA; needs a CUDA GPU)."
    )
    quantization_method: Literal["bnb"] = option(
        "bnb", "On-the-fly quantization library: bnb (bitsandbytes). GPTQ/AWQ models are detected from their config."
    )
    quantization_type: Literal["nf4", "fp4"] = option("nf4", "4-bit data type: nf4 (QLoRA's) or fp4.")
    double_quantization: bool = option(True, "4-bit: quantize the quantization constants too (saves ~0.4 bit/weight).")

    def _check(self) -> list[str]:
        if self.quantization_bit not in (None, 4, 8):
            return [f"quantization_bit: got {self.quantization_bit}; expected 4 or 8 (or leave it unset)"]
        return []

    def to_saved_dict(self) -> dict:
        """``to_dict()`` for files written next to artifacts: the hub token is never saved."""
        data = self.to_dict()
        if data.get("hf_hub_token"):
            data["hf_hub_token"] = "<redacted>"
        return data
