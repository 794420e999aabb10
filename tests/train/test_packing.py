"""Padding-free packing: several examples per row give exactly the loss and gradients of training them unpacked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from finetune_kit import DatasetRegistry, LoraTrainer
from finetune_kit.config.parse import build
from finetune_kit.data.config import EncodingConfig
from finetune_kit.data.encode import knapsacks
from finetune_kit.data.packed import PackedCollator, VarlenCollator, real_length, segment_starts
from finetune_kit.data.tokenize import tokenize
from finetune_kit.errors import ConfigError
from finetune_kit.models import varlen
from finetune_kit.train.loss import check_kernels

VOCAB, PAD = 256, 0


def tiny(attn: str = "sdpa", *, vocab: int = VOCAB, tie: bool = False) -> LlamaForCausalLM:
    """A 2-layer, hidden-32 random Llama in float32 (grouped-query heads), built in memory (the training tests')."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg).float()


def examples() -> list[dict[str, list[int]]]:
    """Examples of mixed lengths; prompts masked, one trained from its first token (train_on_prompt / pt)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for length, prompt in ((5, 2), (9, 4), (3, 0), (12, 6), (7, 0), (1, 0)):
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def pack(rows: list[dict[str, list[int]]], width: int) -> list[dict[str, list[int]]]:
    """LLaMA-Factory-style packed rows: examples joined, positions restarting, padded to ``width``."""
    packed = []
    for group in (rows[:3], rows[3:]):
        ids = [t for r in group for t in r["input_ids"]]
        labels = [t for r in group for t in r["labels"]]
        positions = [p for r in group for p in range(len(r["input_ids"]))]
        pad = width - len(ids)
        packed.append(
            {
                "input_ids": ids + [PAD] * pad,
                "labels": labels + [-100] * pad,
                "position_ids": positions + [0] * pad,
                "attention_mask": [1] * width,
            }
        )
    return packed


def padded(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """The usual unpacked batch: right padding, an attention mask, padded labels ignored."""
    width = max(len(r["input_ids"]) for r in rows)
    fill = [width - len(r["input_ids"]) for r in rows]
    return {
        "input_ids": torch.tensor([r["input_ids"] + [PAD] * f for r, f in zip(rows, fill, strict=True)]),
        "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * f for r, f in zip(rows, fill, strict=True)]),
        "labels": torch.tensor([r["labels"] + [-100] * f for r, f in zip(rows, fill, strict=True)]),
    }


def run(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_logits_and_gradients_equal_unpacked(attn):
    model = tiny(attn)
    rows = examples()
    unpacked = padded(rows)
    packed = PackedCollator(pad_token_id=PAD)(pack(rows, width=24))
    # trailing padding trimmed, and the last one-token example with it (it trains nothing)
    assert "attention_mask" not in packed and packed["input_ids"].shape == (2, 19)
    loss_u, grads_u = run(model, unpacked)
    loss_p, grads_p = run(model, packed)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-6, atol=1e-6)
    for name, g in grads_u.items():
        torch.testing.assert_close(grads_p[name], g, rtol=1e-5, atol=1e-6, msg=name)
    # no attention crosses an example: each example's logits are its logits alone
    with torch.no_grad():
        logits_p = model(**{k: v for k, v in packed.items() if k != "labels"}).logits
        for r, (row, start) in zip(rows, [(0, 0), (0, 5), (0, 14), (1, 0), (1, 12)], strict=False):
            alone = model(input_ids=torch.tensor([r["input_ids"]])).logits[0]
            torch.testing.assert_close(logits_p[row, start : start + len(r["input_ids"])], alone, rtol=1e-5, atol=1e-5)


def test_one_padding_free_row_gives_the_padded_batch_loss_and_gradients():
    """The varlen collator's single row (packed or plain rows in) trains exactly like the padded batch; on
    CPU the registered attention is SDPA over transformers' packed-sequence mask."""
    model = tiny("sdpa")
    rows = examples()
    loss_u, grads_u = run(model, padded(rows))
    plain = VarlenCollator()(rows)
    mixed = VarlenCollator()([*pack(rows, width=24)[:1], *rows[3:]])
    for batch in (plain, mixed):
        assert batch["input_ids"].shape == (1, 37) and batch["max_length_q"] == 12
        assert batch["cu_seq_lens_q"].tolist() == [0, 5, 14, 17, 29, 36, 37]
        with varlen.varlen_training(model) as used:  # no CUDA here: nothing changes
            assert used is False and model.config._attn_implementation == "sdpa"
        loss_f, grads_f = run(model, batch)
        torch.testing.assert_close(loss_f, loss_u, rtol=1e-6, atol=1e-6)
        for name, g in grads_u.items():
            torch.testing.assert_close(grads_f[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_the_varlen_attention_is_sdpa_wherever_the_kernel_cannot_run():
    """Registered with transformers, the implementation serves padded batches and generation through SDPA."""
    model = tiny("sdpa")
    batch = padded(examples())
    with torch.no_grad():
        want = model(**batch).logits
        model.set_attn_implementation(varlen.register())
        got = model(**batch).logits
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        greedy = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
        model.set_attn_implementation("sdpa")
        assert greedy.tolist() == model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False).tolist()
    assert "CUDA" in (varlen.varlen_unsupported(model) or "")
    with pytest.raises(ConfigError, match="padding_free: true, but"):
        varlen.padding_free(model, True)
    assert varlen.padding_free(model, "auto") is False and varlen.padding_free(model, False) is False
    with pytest.raises(ConfigError) as err:
        check_kernels(enable_liger_kernel=False, stage="dpo", padding_free=True)
    assert "sft and pt, not dpo" in str(err.value) and "needs a CUDA GPU" in str(err.value)


def test_the_first_label_of_every_example_is_not_trained():
    rows = [{"input_ids": [5, 6, 7, 8, 9, 0], "labels": [5, 6, 7, 8, 9, -100], "position_ids": [0, 1, 2, 0, 1, 0]}]
    batch = PackedCollator(pad_token_id=0, pad_to_multiple_of=8)(rows)
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 0]]
    assert segment_starts([0, 1, 2, 0, 1, 0, 0]) == [0, 3, 5, 6] and real_length([0, 1, 2, 0, 1, 0, 0]) == 5


def test_knapsack_rows_never_exceed_the_budget_and_keep_every_example():
    lengths = [352, 949, 17, 600, 1023, 88, 410, 5, 5, 300]
    bins = knapsacks(list(lengths), 1023)
    assert all(sum(b) <= 1023 for b in bins)
    assert sorted(x for b in bins for x in b) == sorted(lengths)


def write_dataset(folder: Path, n: int = 12) -> DatasetRegistry:
    rows = [
        {"instruction": f"Question {i}: " + "why " * (i % 5), "input": "", "output": "ok " * (1 + i)} for i in range(n)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.json").write_text(json.dumps(rows), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
    return DatasetRegistry.from_dir(folder)


def test_packing_keys_are_accepted_and_pt_neat_packing_keeps_texts_whole(tiny_llama, tmp_path):
    built = build({"packing": True, "neat_packing": "true", "cutoff_len": 64}, [EncodingConfig])
    assert built[EncodingConfig].packing is True and built[EncodingConfig].neat_packing is True
    texts = [{"text": "word " * k} for k in (3, 30, 7, 12)]
    (tmp_path / "pt.json").write_text(json.dumps(texts))
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"pt": {"file_name": "pt.json", "columns": {"prompt": "text"}}})
    )
    data = DatasetRegistry.from_dir(tmp_path).load("pt", stage="pt")
    tok, template = tiny_llama.tokenizer, tiny_llama.template
    plain = tokenize(data, tok, template, cutoff_len=63, stage="pt", packing=False)
    packed = tokenize(data, tok, template, cutoff_len=64, stage="pt", neat_packing=True)
    assert packed.packed and not plain.packed and len(packed) < len(plain)
    pieces = []
    for row in packed.dataset:
        n = real_length(row["position_ids"])
        starts = [*segment_starts(row["position_ids"][:n]), n]
        pieces += [row["input_ids"][a:b] for a, b in zip(starts, starts[1:], strict=False)]
    assert sorted(pieces) == sorted(plain.dataset["input_ids"])


def test_a_trainer_refuses_data_packed_differently_and_packing_for_dpo(tiny_llama, tmp_path):
    data = write_dataset(tmp_path / "data").load("tiny")
    packed = LoraTrainer(tiny_llama).with_data(cutoff_len=64, packing=True)
    tokens = packed.tokenize(data)
    assert tokens.packed and len(tokens) < 12
    with pytest.raises(ConfigError, match="encoded packed"):
        LoraTrainer(tiny_llama).with_data(cutoff_len=64).tokenize(tokens)
    pref = write_dataset(tmp_path / "d2")
    with pytest.raises(ConfigError, match="apply to stage sft and pt"):
        LoraTrainer(tiny_llama).with_dpo().with_data(neat_packing=True).tokenize(pref.load("tiny"))


@pytest.mark.slow
def test_bundled_model_first_step_is_the_same_packed_or_not(tmp_path):
    """Through LoraTrainer.train: one batch holding every example, packed into one row or padded, gives the
    same loss and gradient norm (the bundled model, float32 on CPU)."""
    from finetune_kit.models.source import ModelSource

    model = ModelSource.bundled().load(template="chatml")
    data = write_dataset(tmp_path / "data", n=6).load("tiny")
    logs = {}
    for packing in (False, True):
        result = (
            LoraTrainer(model)
            .with_lora(lora_rank=8, lora_alpha=16)
            .with_data(cutoff_len=512, packing=packing)
            .with_training(
                output_dir=str(tmp_path / f"out-{packing}"),
                learning_rate=1e-3,
                max_steps=2,
                per_device_train_batch_size=6,
                logging_steps=1,
                save_strategy="no",
                disable_tqdm=True,
            )
        ).train(data)
        logs[packing] = [e for e in result.log_history if "loss" in e and "step" in e]
    unpacked, packed = logs[False], logs[True]
    assert packed[0]["loss"] == pytest.approx(unpacked[0]["loss"], abs=2e-4)
    assert packed[0]["grad_norm"] == pytest.approx(unpacked[0]["grad_norm"], rel=1e-3)
    assert packed[1]["loss"] == pytest.approx(unpacked[1]["loss"], abs=2e-4)  # the same update was applied
