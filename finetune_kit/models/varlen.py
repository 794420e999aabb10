"""Padding-free attention for training on CUDA: PyTorch's own variable-length flash-attention kernel.

A padding-free batch (:class:`~finetune_kit.data.packed.VarlenCollator`) is one row holding every
example of the batch back to back, with ``position_ids`` that restart per example and
``cu_seq_lens_q``/``cu_seq_lens_k``/``max_length_q``/``max_length_k``: where each example starts,
the same keyword arguments transformers' flash-attention path reads. No padding token is
computed and no mask is built: each example attends causally to itself alone.

This module registers one more attention implementation with transformers, :data:`VARLEN`:

* given ``cu_seq_lens_q`` on a CUDA tensor in bf16/fp16, it calls
  ``torch.ops.aten._flash_attention_forward`` (the flash-attention 2 kernel that ships inside
  PyTorch; its backward is PyTorch's too), grouped-query heads included: no flash-attn package;
* for anything else (generation with a cache, a padded batch, CPU, float32) it is transformers'
  SDPA path unchanged, with SDPA's masks, so a model left with it behaves as one with ``sdpa``.

:func:`varlen_training` switches a model to it for a training run and back afterwards.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from finetune_kit.errors import ConfigError
from finetune_kit.models.adapters import unwrapped

VARLEN = "finetune_kit_varlen"
"""The attention implementation's name in transformers' ``AttentionInterface``."""


def varlen_unsupported(model: Any) -> str | None:
    """Why ``model`` cannot train with the variable-length kernel here (None: it can)."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if torch.cuda.get_device_capability()[0] < 8:
        return "the flash kernel needs a GPU of compute capability 8.0 or newer"
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return "this PyTorch has no flash-attention kernel"
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in (None, "sdpa"):
        return "the model was loaded with another attention implementation (flash_attn)"
    if not getattr(model, "_supports_attention_backend", False):
        return f"{type(model).__name__} does not use transformers' attention interface"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    if not head_dim or head_dim % 8 or head_dim > 256:
        return f"head size {head_dim}: the flash kernel takes multiples of 8 up to 256"
    if (
        getattr(text, "attn_logit_softcapping", None)
        or getattr(text, "sliding_window", None)
        and any(t == "sliding_attention" for t in getattr(text, "layer_types", None) or ())
    ):
        return "the model uses sliding-window or soft-capped attention"
    dtype = getattr(model, "dtype", None)
    if dtype not in (torch.bfloat16, torch.float16):
        return f"the weights are {dtype}; the flash kernel needs bf16 or fp16"
    return None


@functools.cache
def register() -> str:
    """Register :data:`VARLEN` with transformers (once) and return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)  # the SDPA fallback gets SDPA's masks
    return VARLEN


def varlen_attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Attention over a padding-free batch (``query`` ``[1, heads, tokens, head_dim]``); SDPA otherwise.

    Returns ``[1, tokens, heads, head_dim]``, as every transformers attention function does.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    plain = kwargs.get("sliding_window") is None and kwargs.get("softcap") is None and kwargs.get("s_aux") is None
    if (
        cu is None
        or not plain
        or query.shape[0] != 1
        or not query.is_cuda
        or query.dtype not in (torch.bfloat16, torch.float16)
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    max_len = kwargs.get("max_length_q")
    max_len = int(max_len) if max_len is not None else int((cu[1:] - cu[:-1]).max())
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [tokens, heads, head_dim]
    cu = cu.to(device=q.device, dtype=torch.int32)
    out = torch.ops.aten._flash_attention_forward(
        q,
        k.to(q.dtype),
        v.to(q.dtype),
        cu,
        cu,
        max_len,
        max_len,
        dropout if module.training else 0.0,
        True,  # causal
        False,
        scale=scaling,
    )[0]
    return out.unsqueeze(0), None


@contextmanager
def varlen_training(model: Any, *, enabled: bool = True) -> Iterator[bool]:
    """While inside, ``model`` (or the PEFT model around it) attends with :data:`VARLEN`.

    Yields whether it does: ``enabled`` and :func:`varlen_unsupported` finds nothing against it.
    The previous implementation is back on leaving, so a model handed on after training
    (evaluation, chat, export) is exactly as it was loaded.
    """
    lm = unwrapped(model)
    if not enabled or varlen_unsupported(lm) is not None:
        yield False
        return
    before = lm.config._attn_implementation
    lm.set_attn_implementation(register())
    try:
        yield True
    finally:
        lm.set_attn_implementation(before or "sdpa")


def padding_free(model: Any, setting: bool | str = "auto") -> bool:
    """Whether to train ``model`` on padding-free batches: ``setting`` (``padding_free``) against what
    :func:`varlen_unsupported` finds. ``true`` where it cannot run is a :class:`ConfigError`."""
    if setting is False:
        return False
    lm = unwrapped(model)
    reason = varlen_unsupported(lm)
    if reason is not None and setting is True:
        raise ConfigError(
            f"padding_free: true, but the variable-length attention kernel cannot run: {reason}. "
            "Fix: set padding_free: auto (padded batches where it cannot run) or false"
        )
    return reason is None
