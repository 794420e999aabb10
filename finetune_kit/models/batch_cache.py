"""The running batch's one KV cache: every sequence left-padded to a common width.

:class:`finetune_kit.models.batching.BatchScheduler` keeps the cache as per-layer ``(keys, values)``
tensors of shape ``[batch, heads, width, head size]`` with an attention mask ``[batch, width]``
(0 for padding). These functions pick rows out of it, trim the columns that became padding in
every row, and join two caches of different widths.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from finetune_kit.models.adapters import unwrapped

if TYPE_CHECKING:
    import torch

Layers = list[tuple["torch.Tensor", "torch.Tensor"]]


def layers_of(cache: Any) -> Layers:
    """A ``DynamicCache``'s per-layer ``(keys, values)``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def take_rows(layers: Layers, mask: torch.Tensor, keep: list[int], *, trim: bool) -> tuple[Layers, torch.Tensor]:
    """The rows ``keep`` of a cache and its mask; with ``trim``, without the leading columns that are
    padding in every kept row."""
    import torch

    index = torch.tensor(keep, device=mask.device)
    mask = mask[index]
    lead = int((mask.cumsum(-1) == 0).sum(-1).min()) if trim else 0
    return [(k[index, :, lead:], v[index, :, lead:]) for k, v in layers], mask[:, lead:]


def join(first: Layers, first_mask: torch.Tensor, then: Layers, then_mask: torch.Tensor) -> tuple[Layers, torch.Tensor]:
    """Two caches and masks stacked row-wise, the narrower left-padded to the wider one's width."""
    import torch

    width = max(first_mask.shape[-1], then_mask.shape[-1])
    layers = [
        (
            torch.cat([left_pad(k0, width), left_pad(k1, width)]),
            torch.cat([left_pad(v0, width), left_pad(v1, width)]),
        )
        for (k0, v0), (k1, v1) in zip(first, then, strict=True)
    ]
    return layers, torch.cat([left_pad(first_mask, width), left_pad(then_mask, width)])


def left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` with zeros added before its sequence axis (-2 for cache tensors [b, h, s, d], -1 for masks)."""
    import torch.nn.functional as F

    axis = -1 if t.dim() == 2 else -2
    missing = width - t.shape[axis]
    if missing == 0:
        return t
    return F.pad(t, (missing, 0)) if axis == -1 else F.pad(t, (0, 0, missing, 0))


def cache_keyword(model: Any) -> str:
    """``cache`` in transformers ≥ 5.2x, ``past_key_values`` before (the same argument, renamed)."""
    params = inspect.signature(type(unwrapped(model)).forward).parameters
    return "cache" if "cache" in params else "past_key_values"
