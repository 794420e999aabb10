"""The trainer owns loading, hands its model on in memory, tokenizes once and never changes the caller's model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune_kit import ConfigError, DatasetRegistry, Exporter, LoraTrainer, ModelSource, TrainResult
from finetune_kit.data.tokenize import TokenizedDataset

# loads from disk ask for float32 (on a GPU the inference default is bf16); CUDA kernels sum in another order
ATOL = 1e-5 if not torch.cuda.is_available() else 1e-3
ROWS = [{"instruction": f"question {i}", "input": "", "output": f"answer number {i}"} for i in range(4)]


@pytest.fixture()
def data(tmp_path: Path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "t.json").write_text(json.dumps(ROWS))
    (folder / "dataset_info.json").write_text(json.dumps({"t": {"file_name": "t.json"}}))
    return DatasetRegistry.from_dir(folder).load("t")


def trainer(model, out: Path, **training) -> LoraTrainer:
    settings = dict(
        output_dir=out,
        learning_rate=5e-2,
        max_steps=3,
        per_device_train_batch_size=4,
        save_steps=1000,
        disable_tqdm=True,
        logging_steps=1,
    )
    settings.update(training)
    return LoraTrainer(model).with_lora(lora_rank=4).with_data(cutoff_len=64).with_training(**settings)


def logits(model, text: str = "question 1") -> torch.Tensor:
    ids = torch.tensor([model.encode_prompt(text)], device=model.device)
    with torch.no_grad():
        return model.model(input_ids=ids).logits.float().cpu()


def test_with_data_refuses_selection_keys_at_the_call(tiny_llama):
    with pytest.raises(ConfigError) as info:
        LoraTrainer(tiny_llama).with_data(val_size=0.1, dataset="x", cutoff_len=64)
    text = str(info.value)
    assert "val_size" in text and "split" in text and "dataset" in text and "2 problems" in text


def test_output_dir_accepts_a_path(tiny_llama, tmp_path):
    assert LoraTrainer(tiny_llama).with_training(output_dir=tmp_path / "x").training.output_dir == str(tmp_path / "x")


def test_trainer_loads_a_model_source_itself_and_hands_the_model_on(tiny_llama_dir, data, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    loads = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0])
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    source = ModelSource.local(tiny_llama_dir).with_config(template="chatml")
    t = trainer(source, tmp_path / "out")
    plan = t.load_plan()
    device = "cpu" if not torch.cuda.is_available() else f"cuda:{torch.cuda.current_device()}"
    assert plan is not None and plan.purpose == "training" and plan.dtype == "float32" and plan.device == device
    assert "for training" in t.explain() and loads == []  # explain reads no weights
    result = t.train(data)
    assert len(loads) == 1
    tuned = result.load()
    assert tuned is result.model and len(loads) == 1  # the in-memory model, not a reload
    assert tuned.adapters == (str(tmp_path / "out"),)
    # the in-memory model answers like the one loaded back from disk
    reopened = TrainResult.from_dir(tmp_path / "out").load(infer_dtype="float32")
    torch.testing.assert_close(logits(tuned), logits(reopened), atol=ATOL, rtol=0)


def test_tokenize_once_and_reuse(tiny_llama, data, tmp_path, monkeypatch):
    from finetune_kit.train import tokens as trainer_module

    calls = []
    real = trainer_module.tokenize_cached
    monkeypatch.setattr(trainer_module, "tokenize_cached", lambda *a, **k: calls.append(1) or real(*a, **k))
    t = trainer(tiny_llama, tmp_path / "out")
    assert "TokenizedDataset(4 examples" in t.explain(data)
    t.train(data)
    assert len(calls) == 1
    tokens = t.tokenize(data)
    assert isinstance(tokens, TokenizedDataset) and len(calls) == 1
    with pytest.raises(ConfigError, match="cutoff_len=64.*cutoff_len=32"):
        t.with_data(cutoff_len=32).train(tokens)


def test_a_loaded_adapter_is_not_trained_in_place(tiny_llama, data, tmp_path):
    first = trainer(tiny_llama, tmp_path / "a").train(data)
    model_a = tiny_llama.with_adapter(first.output_dir)
    before = {k: v.clone() for k, v in model_a.model.state_dict().items()}
    before_logits = logits(model_a)
    continued = trainer(model_a, tmp_path / "b", learning_rate=1e-1).train(data)
    after = model_a.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(logits(model_a), before_logits, atol=0, rtol=0)
    assert not torch.allclose(logits(continued.load()), before_logits, atol=1e-4)
    assert continued.load().adapters == (str(tmp_path / "b"),)


def test_continuing_stacked_adapters_reloads_with_both(tiny_llama_dir, data, tmp_path):
    source = ModelSource.local(tiny_llama_dir).with_config(template="chatml")
    a = trainer(source, tmp_path / "a").train(data)
    b = trainer(source, tmp_path / "b", seed=7, learning_rate=1e-1).train(data)
    stacked = source.with_config(adapter_name_or_path=(str(a.output_dir), str(b.output_dir)))
    c = trainer(stacked, tmp_path / "c", max_steps=2).train(data)
    assert c.adapters == (str(a.output_dir), str(tmp_path / "c"))
    in_memory = logits(c.load())
    from_disk = logits(TrainResult.from_dir(tmp_path / "c").load(infer_dtype="float32"))
    torch.testing.assert_close(from_disk, in_memory, atol=ATOL, rtol=0)
    without_a = logits(source.load(adapter_name_or_path=str(tmp_path / "c"), infer_dtype="float32"))
    assert not torch.allclose(from_disk, without_a, atol=1e-4), "adapter a must still be applied"


def test_with_adapter_shares_weights_and_leaves_the_base_alone(tiny_llama, data, tmp_path):
    result = trainer(tiny_llama, tmp_path / "out").train(data)
    base_logits = logits(tiny_llama)
    tuned = tiny_llama.with_adapter(result.output_dir)
    assert not hasattr(tiny_llama.model, "peft_config")
    embed = tiny_llama.model.get_input_embeddings().weight
    assert tuned.model.get_input_embeddings().weight is embed  # shared, not copied
    torch.testing.assert_close(logits(tuned), logits(result.load()), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(tiny_llama), base_logits, atol=0, rtol=0)


def test_export_from_memory_leaves_the_trained_model_unmerged(tiny_llama, data, tmp_path):
    result = trainer(tiny_llama, tmp_path / "out").train(data)
    tuned = result.load()
    before = logits(tuned)
    exported = Exporter(tuned).merge(tmp_path / "merged")
    torch.testing.assert_close(logits(tuned), before, atol=0, rtol=0)
    assert any("lora_" in k for k in tuned.model.state_dict())
    torch.testing.assert_close(logits(exported.load(infer_dtype="float32")), before, atol=max(ATOL, 1e-4), rtol=0)
    assert not hasattr(tiny_llama.model, "peft_config")


def test_a_newer_run_record_still_loads_with_a_warning(tiny_llama, data, tmp_path):
    from finetune_kit import FinetuneKitWarning

    out = tmp_path / "out"
    trainer(tiny_llama, out).train(data)
    record = json.loads((out / "finetune_kit_config.json").read_text())
    record["finetune_kit_version"] = "99.0.0"
    record["config"]["model"]["a_future_field"] = 1
    record["future_key"] = {"x": 1}
    (out / "finetune_kit_config.json").write_text(json.dumps(record))
    with pytest.warns(FinetuneKitWarning, match="a_future_field|newer"):
        reopened = TrainResult.from_dir(out)
    assert reopened.base.display_name == tiny_llama.source.display_name


def test_resumed_curve_equals_the_uninterrupted_one(tiny_llama, data, tmp_path):
    from finetune_kit import FinetuneKitWarning

    # a constant schedule, so the run stopped at step 2 planned the same learning rates as the whole one
    same = dict(per_device_train_batch_size=2, lr_scheduler_type="constant", save_steps=2)
    whole = trainer(tiny_llama, tmp_path / "whole", max_steps=4, **same).train(data)
    trainer(tiny_llama, tmp_path / "parts", max_steps=2, **same).train(data)
    with pytest.warns(FinetuneKitWarning, match="Resuming"):
        resumed = trainer(tiny_llama, tmp_path / "parts", max_steps=4, **same).train(data)
    assert [s for s, _ in resumed.losses] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(whole.losses, resumed.losses, strict=False):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


def test_explain_a_continued_adapter_names_its_targets(tiny_llama, data, tmp_path):
    first = trainer(tiny_llama, tmp_path / "a").with_lora(lora_target="q_proj,v_proj").train(data)
    text = trainer(tiny_llama.with_adapter(first.output_dir), tmp_path / "b").explain()
    assert "targets:          q_proj, v_proj" in text and "base_layer" not in text
    lora = sum(p.numel() for n, p in first.load().model.named_parameters() if "lora_" in n)
    assert f"trainable params: {lora:,} of " in text
