"""The training loss over the output head in chunks of tokens: never the whole [tokens, vocabulary] logits.

A causal LM's ``forward`` computes ``lm_head`` over every position and then the cross-entropy in
float32. With a large vocabulary (Qwen2.5's 151,936) those logits, their float32 copy and their
gradient are most of a small model's training memory. :func:`chunked_loss` swaps the forward of
the model being trained, while it trains, for one that

* runs the decoder, keeps only the positions whose (shifted) label is trained (a prompt's
  positions never reach the head), and
* computes the loss of those positions a chunk at a time: for a plain ``nn.Linear`` head one
  autograd function works out the loss *and* its gradients chunk by chunk in the forward pass
  (the backward only scales them); any other head (a LoRA-wrapped or trained copy, a quantized
  one) runs each chunk under activation checkpointing instead.

The mathematics is the model's own: the same shift, ignore index (-100), float32 log-softmax and
normalisation (by ``num_items_in_batch`` when the trainer passes it, else by the trained tokens),
so loss and gradients equal the ordinary ones up to float rounding (tests/train/test_chunked_loss.py).
Outside training (``model.eval()``), without labels, or for heads that transform the logits
(soft-capping, logit scales, MoE router losses) the model's own forward runs unchanged.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from finetune_kit.data.encode import IGNORE_INDEX
from finetune_kit.errors import ConfigError
from finetune_kit.models.adapters import unwrapped

LOGIT_BUDGET_BYTES = 2**28
"""Float32 logits held per chunk (256 MiB): 441 tokens of a 152k vocabulary, 2,048 of a 32k one."""

# config attributes of heads whose logits are transformed before the loss: the model's forward stays
_TRANSFORMED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_router_logits")

logger = logging.getLogger("finetune_kit.train")


def check_kernels(*, enable_liger_kernel: bool, stage: str, padding_free: bool | str = "auto") -> None:
    """Refuse ``enable_liger_kernel`` and ``padding_free: true`` where they cannot run: no CUDA GPU, no
    liger-kernel, a stage but sft/pt."""
    import torch

    problems = []
    for key, wanted, kernel, fix in (
        (
            "padding_free",
            padding_free is True,
            "PyTorch's variable-length flash kernel",
            "remove it (auto uses it wherever it can run) or set padding_free: false",
        ),
        (
            "enable_liger_kernel",
            enable_liger_kernel,
            "Liger's kernels are Triton kernels",
            "remove it (on this machine the chunked loss, chunked_loss: true by default, already keeps the "
            "logits out of memory)",
        ),
    ):
        if not wanted:
            continue
        if stage not in ("sft", "pt"):
            problems.append(f"{key} applies to stage sft and pt, not {stage}. Fix: remove it")
        if not torch.cuda.is_available():
            problems.append(f"{key}: true needs a CUDA GPU ({kernel}). Fix: {fix}")
        elif key == "enable_liger_kernel" and importlib.util.find_spec("liger_kernel") is None:
            problems.append("enable_liger_kernel: true needs the liger-kernel package. Fix: pip install liger-kernel")
    if problems:
        raise ConfigError(problems)


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk so one chunk's float32 logits stay within :data:`LOGIT_BUDGET_BYTES`."""
    return max(16, LOGIT_BUDGET_BYTES // (4 * max(vocab_size, 1)))


def supports_chunked_loss(model: Any) -> bool:
    """True when ``model``'s forward is decoder + linear head + plain cross-entropy (what the chunked loss replaces)."""
    lm = unwrapped(model)
    config = getattr(lm, "config", None)
    if config is None or not type(lm).__name__.endswith("ForCausalLM"):
        return False
    if any(getattr(config, name, None) for name in _TRANSFORMED_LOGITS):
        return False
    decoder = getattr(lm, "base_model", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    return decoder is not None and decoder is not lm and head is not None


@contextmanager
def chunked_loss(model: Any, *, enabled: bool = True) -> Iterator[bool]:
    """While inside, ``model`` (a causal LM or a PEFT model around one) trains with the chunked loss.

    Yields whether it does (``enabled`` and :func:`supports_chunked_loss`). The model's own forward
    is back on leaving. Example::

        with chunked_loss(model):
            trainer.train()
    """
    if not enabled or not supports_chunked_loss(model):
        yield False
        return
    lm = unwrapped(model)
    own = lm.forward
    wrapped = lm.__dict__.get("forward")  # an instance forward already there (accelerate's device hooks)
    lm.forward = functools.partial(_chunked_forward, lm, own)
    try:
        yield True
    finally:
        if wrapped is None:
            del lm.forward  # the class's forward again
        else:
            lm.forward = wrapped


def _chunked_forward(lm: Any, own: Any, *args: Any, **kwargs: Any) -> Any:
    """The causal LM's forward with the chunked loss (its own forward when not training, without labels,
    with a cache or with positional arguments)."""
    labels = kwargs.get("labels")
    cached = kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None
    if args or labels is None or not lm.training or cached:
        return own(*args, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = kwargs.pop("num_items_in_batch", None)
    for key in ("labels", "logits_to_keep", "return_dict", "use_cache", "past_key_values", "cache"):
        kwargs.pop(key, None)
    out = lm.base_model(use_cache=False, **kwargs)
    loss = causal_lm_loss(out.last_hidden_state, lm.get_output_embeddings(), labels, num_items_in_batch=num_items)
    return CausalLMOutputWithPast(loss=loss, hidden_states=out.hidden_states, attentions=out.attentions)


def causal_lm_loss(hidden: Any, head: Any, labels: Any, *, num_items_in_batch: Any = None, chunk: int = 0) -> Any:
    """Next-token cross-entropy of ``head(hidden)`` against ``labels``, chunk by chunk.

    ``hidden`` is ``[batch, length, hidden]``, ``labels`` ``[batch, length]`` (-100 = not trained);
    the loss is summed over trained tokens and divided by ``num_items_in_batch`` (or their count),
    as transformers' ``ForCausalLMLoss`` does. ``chunk`` = tokens per chunk (0: by the vocabulary).
    """
    import torch

    width = hidden.shape[-1]
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    trained = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # one host sync: the chunk count is needed
    h = hidden[:, :-1].reshape(-1, width).index_select(0, trained)
    y = targets.index_select(0, trained)
    chunk = chunk or chunk_tokens(head.weight.shape[0])
    if type(head) is torch.nn.Linear:
        total = _fused_function().apply(h, head.weight, head.bias, y, chunk)
    else:
        total = _checkpointed(h, head, y, chunk)
    if num_items_in_batch is None:
        return total / max(int(y.numel()), 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _checkpointed(h: Any, head: Any, y: Any, chunk: int) -> Any:
    """Sum of the chunks' losses, each chunk's logits recomputed in the backward pass (any head module)."""
    import torch
    import torch.nn.functional as F  # noqa: N812
    from torch.utils.checkpoint import checkpoint

    def piece(hc: Any, yc: Any) -> Any:
        return F.cross_entropy(head(hc).float(), yc, reduction="sum")

    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        total = total + checkpoint(piece, h[s : s + chunk], y[s : s + chunk], use_reentrant=False)
    return total if h.shape[0] else total + h.sum() * 0


@functools.cache
def _fused_function() -> Any:
    """The autograd function of a plain linear head: loss and gradients in one chunked forward pass."""
    import torch

    class ChunkedLinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, h: Any, weight: Any, bias: Any, y: Any, chunk: int) -> Any:
            grad_h = torch.zeros_like(h)
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
            grad_b = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and bias.requires_grad else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, h.shape[0], chunk):
                hc, yc = h[s : s + chunk], y[s : s + chunk]
                logits = torch.nn.functional.linear(hc, weight, bias).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
                # d(sum of losses)/d(logits) = softmax - one_hot, built in place of the logits
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(g.shape[0], device=g.device), yc] -= 1
                g_lo = g.to(weight.dtype)
                grad_h[s : s + chunk] = g_lo @ weight
                if grad_w is not None:
                    grad_w += g.t() @ hc.float()
                if grad_b is not None:
                    grad_b += g.sum(0)
            ctx.save_for_backward(grad_h, grad_w, grad_b)
            ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
            return total

        @staticmethod
        def backward(ctx: Any, grad_total: Any) -> Any:
            grad_h, grad_w, grad_b = ctx.saved_tensors
            w_dtype, b_dtype = ctx.dtypes
            scale = grad_total.float()
            dh = (grad_h.float() * scale).to(grad_h.dtype)
            dw = (grad_w * scale).to(w_dtype) if grad_w is not None else None
            db = (grad_b * scale).to(b_dtype) if grad_b is not None else None
            return dh, dw, db, None, None

    return ChunkedLinearCrossEntropy
