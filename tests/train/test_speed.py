"""Kernel choices of the training loop change no numbers: PEFT's input casts off under autocast, SDPA backends."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from test_packing import examples, padded, tiny

from finetune_kit.train.speed import no_cudnn_attention, no_input_casts


def lora_model(use_dora: bool = False):
    base = tiny("sdpa").to(torch.bfloat16)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora, init_lora_weights=False)
    model = get_peft_model(base, config)  # adapters upcast to float32 over the bf16 base, as in training
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    return model


def step(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**padded(examples())).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_lora_without_input_casts_is_bitwise_the_same_under_autocast():
    model = lora_model()
    want_loss, want = step(model)
    with no_input_casts(model, mixed_precision=True) as used:
        assert used
        layer = model.base_model.model.model.layers[0].mlp.down_proj
        assert layer.cast_input_dtype_enabled is False
        got_loss, got = step(model)
    assert layer.cast_input_dtype_enabled is True  # back on leaving
    assert torch.equal(got_loss, want_loss)
    assert want.keys() == got.keys() and len(want) == 14 * 2  # 7 adapted projections x 2 layers, A and B
    for name, g in want.items():
        assert torch.equal(got[name], g), name


def test_input_casts_stay_without_mixed_precision_or_with_dora():
    model = lora_model()
    with no_input_casts(model, mixed_precision=False) as used:
        assert used is False
    with no_input_casts(lora_model(use_dora=True), mixed_precision=True) as used:
        assert used is False
    with no_input_casts(tiny("sdpa"), mixed_precision=True) as used:  # no adapters: nothing to switch
        assert used is False


def test_sdpa_backends_are_left_alone_without_cuda():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with no_cudnn_attention():
        assert torch.backends.cuda.cudnn_sdp_enabled() is (before if not torch.cuda.is_available() else False)
    assert torch.backends.cuda.cudnn_sdp_enabled() is before
