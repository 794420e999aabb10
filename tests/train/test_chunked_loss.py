"""The chunked loss over the output head equals the model's own loss and gradients (float32)."""

from __future__ import annotations

import pytest
import torch
from test_packing import tiny as tiny_llama
from transformers import LlamaForCausalLM

from finetune_kit.errors import ConfigError
from finetune_kit.train.loss import causal_lm_loss, check_kernels, chunked_loss, supports_chunked_loss

VOCAB = 320


def tiny(*, tie: bool = False) -> LlamaForCausalLM:
    return tiny_llama(vocab=VOCAB, tie=tie)


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 21), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100  # a prompt
    labels[1, 15:] = -100  # padding
    labels[2, :] = -100
    labels[2, 10:13] = ids[2, 10:13]
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_and_grads(model: torch.nn.Module, chunked: bool, **extra) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    model.train()
    with chunked_loss(model, enabled=chunked) as on:
        assert on is chunked
        loss = model(**batch(), **extra).loss
    loss.backward()
    return loss.item(), grads(model)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("extra", [{}, {"num_items_in_batch": torch.tensor(40)}])
def test_chunked_loss_and_gradients_equal_the_model_s_own(tie, extra, monkeypatch):
    monkeypatch.setattr("finetune_kit.train.loss.LOGIT_BUDGET_BYTES", 4 * VOCAB * 5)  # chunks of 5 tokens
    model = tiny(tie=tie)
    own_loss, own_grads = loss_and_grads(model, False, **extra)
    loss, chunk_grads = loss_and_grads(model, True, **extra)
    assert loss == pytest.approx(own_loss, rel=1e-6, abs=1e-6)
    assert set(chunk_grads) == set(own_grads)
    for name, g in own_grads.items():
        torch.testing.assert_close(chunk_grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
    assert type(model).forward is LlamaForCausalLM.forward and "forward" not in model.__dict__


def test_a_wrapped_head_runs_each_chunk_under_checkpointing():
    model = tiny()
    hidden = torch.randn(2, 9, 32, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 9))
    labels[0, :3] = -100

    class Head(torch.nn.Module):  # not a plain nn.Linear: the checkpointed path
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return self.linear(x)

    head = model.lm_head
    ref = torch.nn.functional.cross_entropy(
        head(hidden[:, :-1]).float().reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    (g_ref,) = torch.autograd.grad(ref, hidden)
    for module in (head, Head(head)):
        loss = causal_lm_loss(hidden, module, labels, chunk=4)
        (g,) = torch.autograd.grad(loss, hidden)
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)


def test_a_peft_model_trains_with_the_chunked_loss_and_eval_keeps_logits():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    assert supports_chunked_loss(model)
    own_loss, own_grads = loss_and_grads(model, False)
    loss, chunk_grads = loss_and_grads(model, True)
    assert loss == pytest.approx(own_loss, rel=1e-6)
    assert own_grads and set(chunk_grads) == set(own_grads)
    for name, g in own_grads.items():
        torch.testing.assert_close(chunk_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    model.eval()
    with chunked_loss(model), torch.no_grad():
        assert model(**batch()).logits.shape == (3, 21, VOCAB)


def test_liger_is_refused_where_it_cannot_run():
    check_kernels(enable_liger_kernel=False, stage="dpo")
    with pytest.raises(ConfigError, match="stage sft and pt") as err:
        check_kernels(enable_liger_kernel=True, stage="dpo")
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in str(err.value) and "chunked_loss" in str(err.value)
