"""Kernel choices that make a training step cheaper without changing what it computes.

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
* :func:`fused_lora`: PEFT adds an adapter's output as ``result + lora_B(lora_A(x)) * scaling``,
  which writes the low-rank product, scales it and adds it in three passes over an activation-sized
  tensor (and one more pass in the backward). While training, plain LoRA layers (one active adapter,
  no dropout, no bias, no variant such as DoRA) compute it as one ``addmm`` with the scale as its
  ``alpha``: the matrix library adds into the base layer's output in the same kernel. It is the same
  sum with one rounding fewer. On a packed Llama-3-8B-shape step those passes were a tenth of the
  GPU time.
* :func:`compiled_layers` (``torch_compile``, by default on for sft/pt on one CUDA GPU): each decoder layer
  goes through ``torch.compile``, which fuses its elementwise work (norms, rotary embedding,
  residual adds, the activation) into fewer kernels and cuts the launches the host has to issue.
  All layers of one model share one compiled graph; shapes that change between batches are
  compiled once as dynamic. Chosen by ``auto``, a layer that fails to compile runs as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

from finetune_kit.models.quantize import is_quantized


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


def _fusable(layer: Any, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The adapter ``layer``'s forward can fuse for ``x``, or None (PEFT's own forward then runs)."""
    import torch

    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant or layer.lora_bias.get(name, False):
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity) or layer.fan_in_fan_out:
        return None
    # outside autocast the product needs one dtype (a bf16 base with float32 adapters does not)
    same = x.dtype == layer.lora_A[name].weight.dtype == layer.lora_B[name].weight.dtype
    return name if same or torch.is_autocast_enabled(x.device.type) else None


def _fused_forward(layer: Any) -> Any:
    """A forward for the PEFT LoRA ``layer`` that adds the scaled low-rank product in one ``addmm``."""
    import torch

    peft_forward = type(layer).forward

    def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
        name = _fusable(layer, x, args, kwargs)
        if name is None:
            return peft_forward(layer, x, *args, **kwargs)
        result = layer.base_layer(x)
        low = layer.lora_A[name](layer._cast_input_dtype(x, layer.lora_A[name].weight.dtype))
        b = layer.lora_B[name].weight  # (out, r): read directly, so not under ZeRO-3/FSDP sharding
        flat = torch.addmm(
            result.reshape(-1, result.shape[-1]),
            low.reshape(-1, low.shape[-1]),
            b.t(),
            alpha=layer.scaling[name],
        )
        return flat.view(result.shape).to(result.dtype)

    return forward


@contextmanager
def fused_lora(model: Any, *, enabled: bool = True) -> Iterator[int]:
    """While inside, ``model``'s PEFT LoRA linear layers add their output with one ``addmm`` (yields how many).

    Not ``enabled`` (ZeRO-3/FSDP, where a layer's weights exist only inside its own forward), or
    without LoRA linear layers, nothing changes. Layers whose setting cannot fuse (dropout, DoRA and
    other variants, several active adapters, a disabled or merged adapter) keep PEFT's forward, call
    by call.
    """
    from peft.tuners.lora.layer import Linear

    layers = [m for m in model.modules() if type(m) is Linear] if enabled else []
    for layer in layers:
        layer.forward = _fused_forward(layer)  # type: ignore[method-assign]
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward


def compiles(model: Any, setting: bool | Literal["auto"], *, collates: bool, sharded: bool, processes: int = 1) -> bool:
    """Whether ``torch_compile: setting`` compiles ``model``'s decoder layers for this run.

    ``auto``: in a single process on a CUDA GPU, for the stages whose batches finetune_kit collates
    (sft, pt), with weights neither quantized nor sharded by ZeRO-3/FSDP (where it is measured).
    """
    import torch

    if setting != "auto":
        return bool(setting)
    single = processes == 1 and not sharded
    return torch.cuda.is_available() and collates and single and not is_quantized(model)


@contextmanager
def compiled_layers(model: Any, *, enabled: bool, fall_back: bool = False) -> Iterator[int]:
    """While inside, every decoder layer of ``model`` runs compiled by ``torch.compile`` (yields how many).

    The layers are :func:`decoder_layers`; leaving undoes it (the
    saved model and later generation run the plain layers). With ``fall_back`` a graph that fails
    to compile runs eagerly (dynamo's ``suppress_errors``, which logs the failure) instead of
    stopping the run.
    """
    import torch._dynamo

    layers = decoder_layers(model) if enabled else []
    for layer in layers:
        layer.compile()
    suppress = torch._dynamo.config.suppress_errors
    torch._dynamo.config.suppress_errors = suppress or (fall_back and bool(layers))
    try:
        yield len(layers)
    finally:
        torch._dynamo.config.suppress_errors = suppress
        for layer in layers:
            layer._compiled_call_impl = None


def decoder_layers(model: Any) -> list[Any]:
    """``model``'s decoder layers, in order: the modules transformers can checkpoint one by one."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
