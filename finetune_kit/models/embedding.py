"""Text embeddings from a causal LM: the mean of its last hidden state over a text's tokens.

This is the engine behind ``LoadedModel.embed`` (and so ``/v1/embeddings`` and Ollama's
``/api/embed``). A chat model is not trained for retrieval, so its embeddings are a baseline,
not a replacement for an embedding model; but they come from the weights being served, adapter
included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from finetune_kit.models.adapters import unwrapped
from finetune_kit.models.decoding import pad_token_id

if TYPE_CHECKING:
    from finetune_kit.models.loaded import LoadedModel


def embed_ids(lm: LoadedModel, prompts: Sequence[list[int]], *, batch_size: int, normalize: bool) -> list[list[float]]:
    """One mean-pooled vector per token-id list, in right-padded batches of ``batch_size``.

    Padding goes on the right: under the causal mask no real token sees a pad, and positions
    start at 0 as they do unbatched, so a text gets the same vector in any batch.
    """
    import torch

    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"texts[{i}] has no tokens; embed a text of at least one token")
    decoder, full = _decoder(lm.model)
    pad = pad_token_id(lm)
    vectors: list[list[float]] = []
    lm.model.eval()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([p + [pad] * (width - len(p)) for p in chunk], device=lm.device)
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in chunk], device=lm.device)
        with torch.inference_mode():
            if full:
                out = decoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
                hidden = out.hidden_states[-1]
            else:
                hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            weights = mask.unsqueeze(-1).to(torch.float32)
            pooled = (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1, eps=1e-12)
        vectors.extend(pooled.cpu().tolist())
    return vectors


def _decoder(model: Any) -> tuple[Any, bool]:
    """The transformer body without its LM head (adapter layers included), or the whole model.

    ``True`` in second place means no body was found: the whole model runs and its last hidden
    state is read from ``output_hidden_states``, at the cost of the LM head's logits.
    """
    inner = unwrapped(model)  # unwrap a PeftModel
    body = getattr(inner, "base_model", inner)  # transformers: getattr(self, base_model_prefix, self)
    return (inner, True) if body is inner else (body, False)
