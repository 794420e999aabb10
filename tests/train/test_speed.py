"""Kernel choices of the training loop change no numbers: PEFT's input casts off under autocast, SDPA backends."""

from __future__ import annotations

import copy

import torch
import torch._dynamo
from peft import LoraConfig, get_peft_model
from test_packing import examples, padded, tiny

from finetune_kit.train.config import TrainingConfig
from finetune_kit.train.speed import _fusable, compiled_layers, compiles, fused_lora, no_cudnn_attention, no_input_casts


def lora_model(use_dora: bool = False):
    base = tiny("sdpa").to(torch.bfloat16)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora, init_lora_weights=False)
    model = get_peft_model(base, config)  # adapters upcast to float32 over the bf16 base, as in training
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    return model


def step(model, *, autocast: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward pass (under bf16 autocast unless told): the loss and every gradient."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
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


def fp32_lora(**config):
    base = tiny("sdpa")
    settings = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False) | config
    return get_peft_model(base, LoraConfig(**settings))


def test_fused_lora_equals_peft_in_float32_and_is_undone_on_leaving():
    model = fp32_lora()
    want_loss, want = step(model, autocast=False)
    layer = model.base_model.model.model.layers[1].self_attn.o_proj
    with fused_lora(model) as count:
        assert count == 14  # 7 adapted projections x 2 layers
        assert "forward" in vars(layer)
        got_loss, got = step(model, autocast=False)
    assert "forward" not in vars(layer)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert want.keys() == got.keys() and len(want) == 28
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_lora_under_bf16_autocast_stays_within_rounding():
    model = lora_model()
    exact_loss, exact = step(copy.deepcopy(model).float(), autocast=False)  # the float32 sum both roundings approach
    peft_loss, peft = step(model)
    with fused_lora(model), no_input_casts(model, mixed_precision=True):
        got_loss, got = step(model)
    for loss in (peft_loss, got_loss):
        assert abs(float(loss) - float(exact_loss)) < 1e-3 * float(exact_loss)
    for name, g in exact.items():
        for grads in (peft, got):
            assert cosine(grads[name], g) > 0.998, name


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


def test_fused_lora_keeps_peft_forward_where_it_cannot_fuse():
    x = torch.randn(2, 3, 32)
    dropout = fp32_lora(lora_dropout=0.5)
    dora = fp32_lora(use_dora=True)
    for model in (dropout, dora):
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        with fused_lora(model):
            assert _fusable(layer, x, (), {}) is None
    model = fp32_lora()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert _fusable(layer, x, (), {}) == "default"
    assert _fusable(layer, x, (), {"adapter_names": ["default"] * 2}) is None  # a mixed batch
    assert _fusable(layer, x.to(torch.bfloat16), (), {}) is None  # bf16 input, float32 adapter, no autocast
    with model.disable_adapter():
        assert _fusable(layer, x, (), {}) is None
        with fused_lora(model):
            plain = model(**padded(examples())).logits
    base = tiny("sdpa")(**padded(examples())).logits
    torch.testing.assert_close(plain, base)  # disabled adapters: the base model's output
    with fused_lora(model, enabled=False) as count:
        assert count == 0 and "forward" not in vars(layer)


def test_compiled_layers_give_the_same_loss_and_gradients_and_are_undone():
    model = fp32_lora()
    want_loss, want = step(model, autocast=False)
    layer = model.base_model.model.model.layers[0]
    with fused_lora(model), compiled_layers(model, enabled=True) as count:
        assert count == 2 and layer._compiled_call_impl is not None
        got_loss, got = step(model, autocast=False)
    assert layer._compiled_call_impl is None
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-5, msg=name)
    with compiled_layers(model, enabled=False) as count:
        assert count == 0


def test_torch_compile_auto_is_off_without_cuda_and_an_explicit_choice_wins():
    model = fp32_lora()
    cuda = torch.cuda.is_available()
    assert compiles(model, "auto", collates=True, sharded=False) is cuda
    assert compiles(model, "auto", collates=False, sharded=False) is False  # dpo, kto, rm: trl's loops
    assert compiles(model, "auto", collates=True, sharded=True) is False
    assert compiles(model, "auto", collates=True, sharded=False, processes=2) is False  # DDP: not measured
    assert compiles(model, True, collates=False, sharded=True) is True
    assert compiles(model, False, collates=True, sharded=False) is False
    before = torch._dynamo.config.suppress_errors
    with compiled_layers(model, enabled=True, fall_back=True):
        assert torch._dynamo.config.suppress_errors is True  # a failing graph runs uncompiled under auto
    assert torch._dynamo.config.suppress_errors is before
    assert TrainingConfig().torch_compile == "auto"
