"""Where finetune_kit caches converted checkpoints, and how a GGUF file becomes one.

transformers can read a GGUF file (``from_pretrained(dir, gguf_file=...)``) but dequantizing
takes ~25 s on two cores and the result is marked as non-serializable. We rebuild a plain
model from its config and state dict once, save it as safetensors next to the tokenizer,
and load that directory afterwards (well under a second).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from finetune_kit._artifacts import CACHE_RECORD, provenance, read_record, write_record
from finetune_kit._fs import atomic_dir

MARKER = CACHE_RECORD


def cache_root() -> Path:
    """``$FINETUNE_KIT_CACHE``, else the platform's user cache dir for finetune_kit."""
    env = os.environ.get("FINETUNE_KIT_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("finetune_kit"))


def _fingerprint(gguf: Path) -> dict[str, object]:
    st = gguf.stat()
    return {"gguf": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def converted_dir_for(gguf: Path) -> Path:
    """The cache folder that holds (or will hold) the converted checkpoint of ``gguf``."""
    digest = hashlib.sha1(str(gguf.resolve()).encode()).hexdigest()[:12]
    return cache_root() / "converted" / f"{gguf.stem}-{digest}"


def dequantize_gguf(gguf: Path, target: Path) -> Path:
    """Return ``target`` holding a safetensors checkpoint of ``gguf``, converting once.

    The conversion is written to a temporary sibling folder and renamed into place, so an
    interrupted run never leaves a half-written cache behind.
    """
    fingerprint = _fingerprint(gguf)
    marker = target / MARKER
    if marker.is_file():
        try:
            if read_record(marker)["source"] == fingerprint:
                return target
        except (ValueError, KeyError):
            pass
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf.stem
    # Rebuild from config + state dict: the GGUF-loaded model refuses save_pretrained().
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.generation_config = loaded.generation_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_record(tmp, CACHE_RECORD, provenance("cache", model=str(gguf), source=fingerprint))
    return target
