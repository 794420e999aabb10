"""Two kernel choices that make a training step cheaper without changing what it computes.

* :func:`no_input_casts`: under bf16/fp16 mixed precision PEFT casts every LoRA layer's input to
  the adapter's float32 (a full copy of the activations), and autocast casts it straight back to
  bf16 for the matrix product: two copies per adapted layer and two more in the backward pass,
  for a value that is the same after the round trip (bf16 -> float32 -> bf16 is exact). While
  training under autocast the casts are switched off (``peft.helpers.disable_input_dtype_casting``);
  on a Llama-3-8B shape with LoRA on every linear layer they were about a sixth of the GPU time of
  a packed step and an eighth of the kernel launches of an unpacked one.
* :func:`no_cudnn_attention`: on CUDA, SDPA with an attention mask (padded batches) is routed to
  cuDNN's attention in recent PyTorch releases, which cost about 14 ms of host time per layer
  call on an H200 with batches whose length changes every step (more than the GPU work of the
  whole layer). While training, SDPA picks among flash, memory-efficient and math kernels only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any


def _adapters_cast_safely(model: Any) -> bool:
    """True for a PEFT model whose adapters are plain LoRA (DoRA's magnitude path keeps its casts)."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return False
    return not any(getattr(c, "use_dora", False) for c in configs.values())


@contextmanager
def no_input_casts(model: Any, *, mixed_precision: bool) -> Iterator[bool]:
    """While inside, ``model``'s LoRA layers take their input in the activations' dtype (yields whether).

    Only with ``mixed_precision`` (the trainer's autocast turns every adapter matrix product into a
    bf16/fp16 one anyway) and plain LoRA adapters.
    """
    if not mixed_precision or not _adapters_cast_safely(model):
        yield False
        return
    from peft.helpers import disable_input_dtype_casting

    with disable_input_dtype_casting(model):
        yield True


def no_cudnn_attention() -> Any:
    """A context in which SDPA on CUDA chooses among flash, memory-efficient and math kernels (not cuDNN)."""
    import torch

    if not torch.cuda.is_available():
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
