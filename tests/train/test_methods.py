"""The training methods through the public API, on CPU with the tiny random Llama.

Freeze and full tuning touch exactly the planned weights; PiSSA, DoRA, rsLoRA, LoRA+ and
``create_new_adapter`` save what they claim and load back to the model trained in memory; the
pt, dpo (sigmoid, ipo, orpo, simpo) and kto stages train on the right tokens and their loss goes
down; QLoRA and pre-quantized models fail at configuration time on this CPU machine, with the fix.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune_kit import (
    ConfigError,
    DatasetRegistry,
    EnvironmentCheckError,
    LoadedModel,
    LoraConfig,
    LoraTrainer,
    MissingDependencyError,
    ModelSource,
    TrainResult,
)

# every load here is float32; on a GPU the kernels sum in another order (and may use TF32)
ATOL = 1e-5 if not torch.cuda.is_available() else 1e-3
PROBE = "你们包邮吗？"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the behaviour of a machine without CUDA")


# ------------------------------------------------------------------ helpers and shared runs
def quick(model: LoadedModel | ModelSource, out: Path, **training) -> LoraTrainer:
    settings = dict(
        output_dir=out,
        max_steps=3,
        logging_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        save_steps=1000,
        disable_tqdm=True,
    )
    settings.update(training)
    return LoraTrainer(model).with_data(cutoff_len=64).with_training(**settings)


def logits(model: LoadedModel) -> torch.Tensor:
    ids = torch.tensor([model.encode_prompt(PROBE)], device=model.device)
    with torch.no_grad():
        return model.model(input_ids=ids).logits.float().cpu()


def reopened(result: TrainResult) -> LoadedModel:
    """The run loaded back from its output folder, the way a new process would."""
    return TrainResult.from_dir(result.output_dir).load(infer_dtype="float32")


def adapter_config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def changed(saved: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> set[str]:
    assert set(saved) == set(original)
    return {k for k in original if not torch.equal(saved[k], original[k])}


@pytest.fixture(scope="module")
def demo() -> DatasetRegistry:
    return DatasetRegistry.demo()


@pytest.fixture(scope="module")
def sft(demo: DatasetRegistry):
    return demo.load("shop_alpaca", max_samples=8)


@pytest.fixture(scope="module")
def original(tiny_llama_dir: Path) -> dict[str, torch.Tensor]:
    """The tiny model's weights as saved on disk (a fresh load)."""
    return load_file(tiny_llama_dir / "model.safetensors")


@pytest.fixture(scope="module")
def base(tiny_llama_dir: Path) -> LoadedModel:
    """The caller's model: training from it must leave it as it was loaded."""
    return ModelSource.local(tiny_llama_dir).load(template="smollm2", infer_dtype="float32")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def freeze_run(base, sft, runs) -> TrainResult:
    trainer = quick(base, runs / "freeze").with_freeze(
        freeze_trainable_layers=1, freeze_trainable_modules="mlp", freeze_extra_modules="embed_tokens"
    )
    return trainer.train(sft)


@pytest.fixture(scope="module")
def full_run(base, sft, runs) -> TrainResult:
    return quick(base, runs / "full").with_full().train(sft)


@pytest.fixture(scope="module")
def pissa_run(base, sft, runs) -> TrainResult:
    return quick(base, runs / "pissa", learning_rate=1e-2).with_lora(pissa_init=True, pissa_iter=2).train(sft)


# ------------------------------------------------------------------ freeze and full tuning
def test_freeze_trains_exactly_the_planned_weights(freeze_run, original):
    saved = load_file(freeze_run.output_dir / "model.safetensors")
    planned = {k for k in original if ".layers.1.mlp." in k or "embed_tokens" in k}
    assert len(planned) == 4  # gate/up/down of the last layer + the embeddings
    assert changed(saved, original) == planned


def test_full_tuning_trains_every_weight(full_run, original):
    saved = load_file(full_run.output_dir / "model.safetensors")
    assert changed(saved, original) == set(original)


@pytest.mark.parametrize("run", ["freeze_run", "full_run"])
def test_a_whole_model_result_reloads_to_the_in_memory_model(run, request):
    result: TrainResult = request.getfixturevalue(run)
    assert result.is_adapter is False and result.adapters == ()
    assert not (result.output_dir / "adapter_config.json").exists()
    again = TrainResult.from_dir(result.output_dir)
    assert again.is_adapter is False and again.finetuning_type == result.finetuning_type
    in_memory = result.load()
    assert not hasattr(in_memory.model, "peft_config") and in_memory.template.name == "smollm2"
    torch.testing.assert_close(logits(again.load(infer_dtype="float32")), logits(in_memory), atol=ATOL, rtol=0)


def test_the_callers_model_is_unchanged_by_freeze_full_and_pissa(base, original, freeze_run, full_run, pissa_run):
    assert not hasattr(base.model, "peft_config")
    now = base.model.state_dict()
    assert set(now) == set(original)
    assert [k for k in original if not torch.equal(now[k].cpu(), original[k])] == []
    # and the trained models really differ from it
    for result in (freeze_run, full_run, pissa_run):
        assert not torch.allclose(logits(result.load()), logits(base), atol=1e-4)


# ------------------------------------------------------------------ LoRA variants
def test_pissa_adapter_is_converted_to_apply_to_the_original_base(pissa_run):
    out = pissa_run.output_dir
    cfg = adapter_config(out)
    assert cfg["r"] == 2 * 8 and cfg["init_lora_weights"] is True  # rank 2r, a plain LoRA
    assert not (out / "pissa_init").exists()
    torch.testing.assert_close(logits(reopened(pissa_run)), logits(pissa_run.load()), atol=max(ATOL, 1e-4), rtol=0)


@pytest.fixture(scope="module")
def raw_pissa(base, sft, runs) -> Callable[[int], TrainResult]:
    """A PiSSA run saved without conversion (``pissa_convert: false``), per ``pissa_iter``; trained once."""
    done: dict[int, TrainResult] = {}

    def run(pissa_iter: int) -> TrainResult:
        if pissa_iter not in done:
            trainer = quick(base, runs / f"pissa_raw{pissa_iter}", max_steps=2)
            trainer = trainer.with_lora(pissa_init=True, pissa_iter=pissa_iter, pissa_convert=False)
            done[pissa_iter] = trainer.train(sft)
        return done[pissa_iter]

    return run


def test_pissa_without_conversion_saves_the_raw_adapter(raw_pissa):
    result = raw_pissa(-1)
    cfg = adapter_config(result.output_dir)
    assert cfg["r"] == 8 and cfg["init_lora_weights"] == "pissa"  # rank r; peft redoes the (exact) SVD at load
    saved = load_file(result.output_dir / "adapter_model.safetensors")
    trained = {k: v.cpu() for k, v in result.load().model.state_dict().items() if "lora_" in k}
    assert len(saved) == len(trained) == 2 * 7 * 2  # lora_A and lora_B of 7 linear layers in each of 2 blocks
    for key, value in saved.items():
        torch.testing.assert_close(value, trained[key.replace(".weight", ".default.weight")], atol=0, rtol=0)


def test_a_raw_pissa_adapter_with_fast_svd_is_refused():
    # fast SVD is random: a raw adapter saved with it would reload onto another residual base
    with pytest.raises(ConfigError, match="pissa_iter: -1"):
        LoraConfig(pissa_init=True, pissa_iter=2, pissa_convert=False)


@pytest.mark.parametrize("pissa_iter", [-1])
def test_a_raw_pissa_adapter_reloads_to_the_trained_model(pissa_iter, raw_pissa):
    result = raw_pissa(pissa_iter)
    torch.manual_seed(1234)  # a new process: the random state differs from the one at training
    torch.testing.assert_close(logits(reopened(result)), logits(result.load()), atol=max(ATOL, 1e-4), rtol=0)


def test_dora_and_rslora_are_saved_and_reload(base, sft, runs, tiny_llama_dir):
    trainer = quick(base, runs / "dora").with_lora(use_dora=True, use_rslora=True)
    text = trainer.explain()
    assert "DoRA" in text and "rsLoRA" in text
    result = trainer.train(sft)
    cfg = adapter_config(result.output_dir)
    assert cfg["use_dora"] is True and cfg["use_rslora"] is True
    saved = load_file(result.output_dir / "adapter_model.safetensors")
    magnitude = {k: v for k, v in saved.items() if "lora_magnitude_vector" in k}
    assert len(magnitude) == 2 * 7
    # DoRA starts each magnitude at the row norms of the base weight; training moved them
    weight = load_file(tiny_llama_dir / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    start = weight.norm(dim=1)
    trained = next(v for k, v in magnitude.items() if "layers.0.self_attn.q_proj" in k)
    assert trained.shape == start.shape and not torch.allclose(trained, start, atol=1e-6)
    torch.testing.assert_close(logits(reopened(result)), logits(result.load()), atol=ATOL, rtol=0)


def test_loraplus_gives_the_b_matrices_ratio_times_the_learning_rate(tiny_llama_dir, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    from finetune_kit.train.run import training_arguments
    from finetune_kit.train.stages import objective

    trainer = quick(ModelSource.local(tiny_llama_dir), tmp_path).with_lora(loraplus_lr_ratio=16)
    assert "LoRA+ (B lr x 16" in trainer.explain()

    def learning_rates(lora_ratio_trainer: LoraTrainer) -> dict[str, float]:
        goal = objective(lora_ratio_trainer.method, lora_ratio_trainer.preference, lora_ratio_trainer.lora)
        model = peft.get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
            peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        )
        args = training_arguments(lora_ratio_trainer.training, has_eval=False, cls=goal.arguments)
        hf = goal.trainer(model=model, args=args)
        lr_of = {id(p): group["lr"] for group in hf.create_optimizer().param_groups for p in group["params"]}
        return {name: lr_of[id(p)] for name, p in model.named_parameters() if p.requires_grad}

    rates = learning_rates(trainer)
    assert sorted({lr for name, lr in rates.items() if "lora_B" in name}) == pytest.approx([16e-3])
    assert sorted({lr for name, lr in rates.items() if "lora_A" in name}) == pytest.approx([1e-3])
    plain = learning_rates(trainer.with_lora(loraplus_lr_ratio=None))
    assert sorted(set(plain.values())) == pytest.approx([1e-3])


@pytest.fixture(scope="module")
def adapter_a(tiny_llama_dir, sft, runs) -> TrainResult:
    source = ModelSource.local(tiny_llama_dir).with_config(template="smollm2")
    trainer = quick(source, runs / "a", learning_rate=1e-2, max_steps=2)
    return trainer.with_lora(lora_rank=4, lora_target="q_proj,v_proj").train(sft)


def test_create_new_adapter_merges_a_and_trains_a_fresh_one(tiny_llama_dir, adapter_a, sft, runs):
    a = str(adapter_a.output_dir)
    source = ModelSource.local(tiny_llama_dir).with_config(template="smollm2", adapter_name_or_path=(a,))
    trainer = quick(source, runs / "new").with_lora(lora_rank=4, create_new_adapter=True)
    text = trainer.explain()
    assert "new adapter on the merged ones" in text and "all merged at load time; a new adapter is trained" in text
    result = trainer.train(sft)
    assert result.adapters == (a, str(runs / "new"))  # a stays under the new adapter, merged
    assert TrainResult.from_dir(result.output_dir).adapters == result.adapters
    assert sorted(adapter_config(result.output_dir)["target_modules"]) == trainer.target_modules()
    assert len(trainer.target_modules()) == 7  # its own targets (lora_target: all), not a's two
    tuned = result.load()
    assert list(tuned.model.peft_config) == ["default"]
    torch.testing.assert_close(logits(reopened(result)), logits(tuned), atol=ATOL, rtol=0)
    without_a = source.load(adapter_name_or_path=str(result.output_dir), infer_dtype="float32")
    assert not torch.allclose(logits(without_a), logits(tuned), atol=1e-4), "adapter a must stay applied"


def test_without_create_new_adapter_the_given_adapter_is_continued(tiny_llama_dir, adapter_a, sft, runs):
    a = adapter_a.output_dir
    source = ModelSource.local(tiny_llama_dir).with_config(template="smollm2", adapter_name_or_path=(str(a),))
    trainer = quick(source, runs / "continued", max_steps=2).with_lora(lora_rank=4)
    result = trainer.train(sft)
    assert result.adapters == (str(runs / "continued"),)  # it replaces a
    assert sorted(adapter_config(result.output_dir)["target_modules"]) == ["q_proj", "v_proj"]
    before = load_file(a / "adapter_model.safetensors")
    after = load_file(result.output_dir / "adapter_model.safetensors")
    assert set(before) == set(after)
    # it started from a's weights (a fresh lora_A is random, ~0.1 away) and trained them further
    assert all((after[k] - before[k]).abs().max() < 1e-2 for k in before)
    assert any(not torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(logits(reopened(result)), logits(result.load()), atol=ATOL, rtol=0)


def test_the_plan_of_a_continued_adapter_from_a_source_names_its_targets(tiny_llama_dir, adapter_a):
    source = ModelSource.local(tiny_llama_dir).with_config(adapter_name_or_path=(str(adapter_a.output_dir),))
    trainer = LoraTrainer(source).with_lora(lora_rank=4)
    assert trainer.target_modules() == ["q_proj", "v_proj"]  # what training continues (see the test above)
    assert "targets:          q_proj, v_proj" in trainer.explain()


# ------------------------------------------------------------------ stages
def test_pretraining_trains_every_token(base, demo):
    trainer = LoraTrainer(base).with_pretraining().with_data(cutoff_len=64)
    assert "pt (pre-training: loss on every token)" in trainer.explain()
    tokens = trainer.tokenize(demo.load("shop_text", max_samples=8, stage="pt"))
    assert tokens.stage == "pt" and len(tokens) > 0
    rows = tokens.dataset
    assert all(row["labels"] == row["input_ids"] for row in rows)
    assert tokens.num_trained_tokens == tokens.num_tokens
    sft_tokens = LoraTrainer(base).with_data(cutoff_len=64).tokenize(demo.load("shop_alpaca", max_samples=8))
    assert sft_tokens.num_trained_tokens < sft_tokens.num_tokens  # sft masks the prompt: a contrast that can fail


PREFERENCE: dict[str, tuple[Callable[[LoraTrainer], LoraTrainer], str, str, str]] = {
    # name: (method, dataset, stage, a metric the stage logs)
    "dpo-sigmoid": (lambda t: t.with_dpo(pref_loss="sigmoid"), "shop_dpo", "dpo", "rewards/accuracies"),
    "dpo-ipo": (lambda t: t.with_dpo(pref_loss="ipo"), "shop_dpo", "dpo", "rewards/margins"),
    "orpo": (lambda t: t.with_dpo(pref_loss="orpo"), "shop_dpo", "dpo", "log_odds_ratio"),
    "simpo": (lambda t: t.with_dpo(pref_loss="simpo"), "shop_dpo", "dpo", "rewards/margins"),
    "kto": (lambda t: t.with_kto(), "shop_kto", "kto", "kl"),
}
EXPLAINED = {
    "dpo-sigmoid": "TRL's DPOTrainer; reference = the base with the adapter off",
    "dpo-ipo": "dpo with ipo loss (TRL's DPOTrainer",
    "orpo": "TRL's ORPOTrainer; no reference model",
    "simpo": "TRL's CPOTrainer; no reference model",
    "kto": "TRL's KTOTrainer",
}


@pytest.fixture(scope="module")
def preference_run(base, demo, runs) -> Callable[[str], TrainResult]:
    """Train a preference method once (5 steps, the same 2 rows each step, a high learning rate)."""
    done: dict[str, TrainResult] = {}

    def run(name: str) -> TrainResult:
        if name not in done:
            method, dataset, stage, _ = PREFERENCE[name]
            trainer = method(quick(base, runs / name, max_steps=5, learning_rate=1e-2, lr_scheduler_type="constant"))
            done[name] = trainer.train(demo.load(dataset, max_samples=2, stage=stage))
        return done[name]

    return run


@pytest.mark.parametrize("name", list(PREFERENCE))
def test_preference_stage_trains_and_its_loss_goes_down(name, preference_run, base):
    method, _, stage, metric = PREFERENCE[name]
    assert EXPLAINED[name] in method(LoraTrainer(base)).explain()
    result = preference_run(name)
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 5 and losses[-1] < losses[0], losses
    assert sum(losses[-2:]) / 2 < losses[0]
    assert all(metric in entry for entry in result.log_history if "loss" in entry)
    logged = [json.loads(line) for line in (result.output_dir / "trainer_log.jsonl").read_text().splitlines()]
    assert [row["loss"] for row in logged if "loss" in row] == pytest.approx(losses)
    record = json.loads((result.output_dir / "finetune_kit_config.json").read_text())
    assert record["config"]["method"]["stage"] == stage
    assert (result.output_dir / "adapter_model.safetensors").is_file()


def test_dpo_sigmoid_starts_at_log_2_and_learns_to_rank(preference_run):
    result = preference_run("dpo-sigmoid")
    first, last = result.log_history[0], [e for e in result.log_history if "loss" in e][-1]
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 0
    assert last["rewards/accuracies"] == 1.0 and last["rewards/margins"] > first["rewards/margins"]


@pytest.mark.parametrize("name", ["dpo-sigmoid", "kto"])
def test_the_reference_is_the_base_with_the_adapter_off(name, preference_run):
    result = preference_run(name)
    assert list(result.load().model.peft_config) == ["default"]
    assert not (result.output_dir / "ref").exists()
    assert all(".ref." not in key for key in load_file(result.output_dir / "adapter_model.safetensors"))


def test_pref_ftx_adds_the_supervised_loss(preference_run, base, demo, runs):
    plain = preference_run("dpo-sigmoid").log_history[0]["loss"]
    trainer = quick(base, runs / "ftx", max_steps=1, learning_rate=1e-2).with_dpo(pref_loss="sigmoid", pref_ftx=1.0)
    assert "sft weight 1.0" in trainer.explain()
    mixed = trainer.train(demo.load("shop_dpo", max_samples=2, stage="dpo")).log_history[0]["loss"]
    # + 1.0 x the chosen replies' NLL, about ln(vocab) = 10.8 for a random model
    assert 10.0 < mixed - plain < 11.8


def test_data_tokenized_for_another_stage_is_refused(base, sft, tmp_path):
    tokens = quick(base, tmp_path / "out").tokenize(sft)
    with pytest.raises(ConfigError, match="encoded for stage sft, but the trainer trains stage dpo"):
        quick(base, tmp_path / "out").with_dpo().train(tokens)
    assert not (tmp_path / "out").exists()


def test_kto_with_batch_size_1_is_refused_before_loading(tiny_llama_dir, demo, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    loads = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a)))
    source = ModelSource.local(tiny_llama_dir).with_config(template="smollm2")
    trainer = quick(source, tmp_path / "out", per_device_train_batch_size=1).with_kto()
    with pytest.raises(ConfigError, match="per_device_train_batch_size of 2 or more"):
        trainer.train(demo.load("shop_kto", max_samples=4, stage="kto"))
    assert loads == [] and not (tmp_path / "out").exists()


# ------------------------------------------------------------------ quantization
@NO_CUDA
def test_qlora_on_a_cpu_machine_fails_at_the_call_that_asks_for_it(tiny_llama_dir):
    source = ModelSource.local(tiny_llama_dir)
    trainer = LoraTrainer(source)
    with pytest.raises(EnvironmentCheckError, match="CUDA") as info:
        trainer.with_quantization(quantization_bit=4)
    assert "quantization_bit: 4" in str(info.value) and "Fix:" in str(info.value)
    with pytest.raises(EnvironmentCheckError, match="CUDA"):
        LoraTrainer(source.with_config(quantization_bit=4))
    with pytest.raises(EnvironmentCheckError, match="CUDA"):
        source.with_config(quantization_bit=4).plan()


def test_quantizing_an_already_loaded_model_is_refused(base):
    with pytest.raises(ConfigError, match="needs a ModelSource"):
        LoraTrainer(base).with_quantization(quantization_bit=4)


def test_full_and_freeze_tuning_of_quantized_weights_are_refused(tiny_llama_dir, monkeypatch):
    # as on a CUDA machine with bitsandbytes, where the quantization itself would be allowed
    monkeypatch.setattr("finetune_kit.train.trainer.check_quantization", lambda *args, **kwargs: None)
    source = ModelSource.local(tiny_llama_dir)
    quantized = LoraTrainer(source).with_quantization(quantization_bit=4)
    with pytest.raises(ConfigError, match="finetuning_type: full cannot train quantized weights"):
        quantized.with_full()
    with pytest.raises(ConfigError, match="finetuning_type: freeze cannot train quantized weights"):
        quantized.with_freeze(freeze_trainable_layers=1)
    with pytest.raises(ConfigError, match="finetuning_type: full cannot train quantized weights"):
        LoraTrainer(source).with_full().with_quantization(quantization_bit=4)


@pytest.fixture()
def gptq_copy(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    """The tiny model folder, its config.json marked as a GPTQ checkpoint."""
    if all(importlib.util.find_spec(m) for m in ("optimum", "gptqmodel")):
        pytest.skip("the GPTQ packages are installed here")
    folder = tmp_path / "tiny-gptq"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_prequantized_model_without_its_packages_fails_with_the_install_command(gptq_copy):
    for attempt in (lambda: ModelSource.local(gptq_copy).plan(), lambda: LoraTrainer(ModelSource.local(gptq_copy))):
        with pytest.raises(MissingDependencyError) as info:
            attempt()
        text = str(info.value)
        assert "GPTQ" in text and str(gptq_copy) in text and "Fix: pip install" in text
        assert "optimum" in text or "gptqmodel" in text


def test_a_prequantized_model_error_names_every_missing_package(gptq_copy):
    missing = [m for m in ("optimum", "gptqmodel") if importlib.util.find_spec(m) is None]
    with pytest.raises(MissingDependencyError) as info:
        ModelSource.local(gptq_copy).plan()
    assert all(name in str(info.value) for name in missing)


# ------------------------------------------------------------------ explain
@pytest.mark.parametrize(
    ("configure", "expected"),
    [
        (lambda t: t.with_freeze(freeze_trainable_layers=1, freeze_trainable_modules="mlp"), "freeze tuning of the"),
        (lambda t: t.with_full(), "full tuning of every weight"),
        (lambda t: t.with_lora(use_dora=True), "DoRA"),
        (lambda t: t.with_lora(pissa_init=True, pissa_iter=2), "PiSSA init (2 SVD iterations)"),
        (lambda t: t.with_dpo(), "TRL's DPOTrainer"),
    ],
)
def test_explain_names_the_method(configure, expected, tiny_llama_dir):
    # from a source: the plan is explained from an empty (meta-device) model, no weights are read
    assert expected in configure(LoraTrainer(ModelSource.local(tiny_llama_dir))).explain()
