"""Export settings (LLaMA-Factory's export arguments)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from finetune_kit.config.base import StageConfig, option
from finetune_kit.errors import did_you_mean

# GGUF types: written by llama.cpp's converter, or quantized from f16 by llama.cpp's quantizer (k-quants)
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
KQUANT_TYPES = ("q4_K_M", "q5_K_M", "q6_K")
GGUF_TYPES = CONVERTER_TYPES + KQUANT_TYPES


@dataclass(frozen=True, repr=False)
class ExportConfig(StageConfig):
    """Where and how a merged model is written."""

    section = "export"

    export_dir: str | None = option(None, "Folder for the merged model (required).")
    export_size: int = option(5, "Largest shard size in GB.")
    export_device: Literal["cpu", "auto"] = option("cpu", "Merge on the CPU, or on the GPU when one exists (auto).")
    export_legacy_format: bool = option(False, "Write pytorch_model*.bin instead of safetensors.")
    overwrite_export_dir: bool = option(False, "Replace a non-empty export_dir that is not a finetune_kit export.")
    export_gguf: tuple[str, ...] = option(
        (),
        "Also write GGUF files into export_dir, one per type: f32, f16, bf16, q8_0 (llama.cpp's converter) or the "
        "k-quants q4_K_M, q5_K_M, q6_K (llama.cpp's quantizer); comma-separated for several. A Modelfile for Ollama "
        "is written beside them.",
    )
    gguf_parity: bool = option(
        True,
        "Check each GGUF with llama.cpp: greedy replies to probe prompts compared with the transformers model, and "
        "a chat reply that stops at the end-of-turn token; the results go to parity.json.",
    )
    export_ollama: str | None = option(
        None, "Name for `ollama create NAME -f Modelfile`, run when an ollama binary is on PATH (needs export_gguf)."
    )
    ollama_num_ctx: int | None = option(
        None, "num_ctx in the Modelfile (default: the training cutoff_len when known, else the model's context)."
    )
    export_hub_model_id: str | None = option(
        None, "Push the export to this Hugging Face Hub repository (token: hf_hub_token or the logged-in one)."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        canonical = {t.lower(): t for t in GGUF_TYPES}  # Q4_K_M, q4_k_m, ... as llama.cpp spells them
        spelled = tuple(canonical.get(t.lower(), t) for t in self.export_gguf)
        if spelled != self.export_gguf:
            object.__setattr__(self, "export_gguf", spelled)

    def _check(self) -> list[str]:
        problems = []
        if self.export_size < 1:
            problems.append(f"export_size: got {self.export_size}; expected a positive number of GB")
        for outtype in self.export_gguf:
            if outtype.lower() not in {t.lower() for t in GGUF_TYPES}:
                hint = did_you_mean(outtype, list(GGUF_TYPES))
                problems.append(f"export_gguf: got {outtype!r}; expected one of {', '.join(GGUF_TYPES)}.{hint}")
        if len({t.lower() for t in self.export_gguf}) != len(self.export_gguf):
            problems.append(f"export_gguf: {', '.join(self.export_gguf)} names a type twice")
        if self.export_ollama is not None and not self.export_gguf:
            problems.append("export_ollama needs export_gguf (Ollama runs GGUF files). Fix: add export_gguf: q4_K_M")
        if self.ollama_num_ctx is not None and self.ollama_num_ctx < 1:
            problems.append(f"ollama_num_ctx: got {self.ollama_num_ctx}; expected a positive number of tokens")
        return problems
