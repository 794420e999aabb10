"""Quantized bases: bitsandbytes 4/8-bit loading for QLoRA, and models saved pre-quantized (GPTQ, AWQ, ...).

Both are decided before any weight is read: :func:`check_quantization` fails at configuration
time on a machine that cannot run the request (no CUDA, a kernel package missing), with the fix.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_kit.errors import ConfigError, EnvironmentCheckError, MissingDependencyError
from finetune_kit.models.adapters import unwrapped

if TYPE_CHECKING:
    from finetune_kit.models.config import ModelConfig

# quant_method of a pre-quantized checkpoint -> the (module, pip package) pairs transformers needs to load it
PREQUANTIZED: dict[str, tuple[tuple[str, str], ...]] = {
    "gptq": (("optimum", "optimum"), ("gptqmodel", "gptqmodel")),
    "awq": (("gptqmodel", "gptqmodel"),),
    "bitsandbytes": (("bitsandbytes", "bitsandbytes"),),
    "hqq": (("hqq", "hqq"),),
    "eetq": (("eetq", "eetq"),),
    "compressed-tensors": (("compressed_tensors", "compressed-tensors"),),
}
# methods whose kernels run on a CUDA GPU only
_CUDA_ONLY = {"awq", "bitsandbytes", "eetq"}


def _config_json(path: Path) -> dict[str, Any]:
    config = Path(path) / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def saved_dtype(path: Path) -> str | None:
    """The dtype a model folder's weights were saved in (``config.json``'s ``dtype``/``torch_dtype``), if given."""
    data = _config_json(path)
    value = data.get("dtype") or data.get("torch_dtype")
    return str(value) if value else None


def prequantized_method(path: Path) -> str | None:
    """The ``quant_method`` recorded in a local model folder's config.json (``gptq``, ``awq``, ...), if any."""
    quant = _config_json(path).get("quantization_config") or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    return str(method).lower() if method else None


def check_quantization(cfg: ModelConfig, *, path: Path | None = None) -> None:
    """Raise now, with the fix, when ``cfg`` asks for quantized weights this machine cannot load."""
    import torch

    if cfg.quantization_bit is not None:
        if not torch.cuda.is_available():
            raise EnvironmentCheckError(
                f"quantization_bit: {cfg.quantization_bit} (QLoRA) needs a CUDA GPU: bitsandbytes' 4/8-bit "
                f"kernels do not run on this machine's CPU (torch {torch.__version__}). Fix: run on a GPU machine, "
                "or remove quantization_bit to train LoRA in 16/32-bit"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise MissingDependencyError("bitsandbytes", purpose="QLoRA (quantization_bit)", extra="qlora")
        if path is not None and prequantized_method(path):
            raise ConfigError(
                f"quantization_bit: {cfg.quantization_bit}, but {path} is already quantized "
                f"({prequantized_method(path)}). Fix: remove quantization_bit; LoRA trains on the quantized "
                "weights as they are"
            )
    method = prequantized_method(path) if path is not None else None
    if method is None:
        return
    if method in _CUDA_ONLY and not torch.cuda.is_available():
        raise EnvironmentCheckError(
            f"{path} holds {method.upper()}-quantized weights, whose kernels need a CUDA GPU; this machine has "
            f"none. Fix: run on a GPU machine, or use the unquantized model"
        )
    missing = [package for module, package in PREQUANTIZED.get(method, ()) if importlib.util.find_spec(module) is None]
    if missing:  # every one at once: installing one should not lead to an error about the next
        raise MissingDependencyError(" ".join(missing), purpose=f"Loading the {method.upper()}-quantized model {path}")


def bnb_config(cfg: ModelConfig, compute_dtype: str) -> Any:
    """``transformers.BitsAndBytesConfig`` for ``quantization_bit`` 4 or 8 (None when not quantizing)."""
    if cfg.quantization_bit is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if cfg.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        bnb_4bit_use_double_quant=cfg.double_quantization,
        bnb_4bit_quant_type=cfg.quantization_type,
        bnb_4bit_quant_storage=getattr(torch, compute_dtype),
    )


def is_quantized(model: Any) -> bool:
    """True for a model whose weights are stored quantized (bitsandbytes, GPTQ, AWQ, ...)."""
    base = unwrapped(model)
    return bool(getattr(base, "is_quantized", False) or getattr(base, "hf_quantizer", None))
