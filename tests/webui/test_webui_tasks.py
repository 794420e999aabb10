"""What the Train (data), Evaluate, Export and Chat buttons do, called directly on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_kit import ConfigError, DatasetError, LoraTrainer, OutputExistsError
from finetune_kit.data.registry import DatasetRegistry
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.webui import tasks
from finetune_kit.webui.form import BUNDLED_MODEL, DEMO_DATA
from finetune_kit.webui.models import ModelCache, ModelChoice

BENCH = Path(__file__).resolve().parents[1] / "evaluate" / "benchmarks"


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("board") / "lora"
    data = DatasetRegistry.demo().load("shop_alpaca", max_samples=8)
    trainer = (
        LoraTrainer(tiny_llama)
        .with_lora(lora_rank=4)
        .with_data(cutoff_len=64)
        .with_training(output_dir=str(out), learning_rate=5e-2, max_steps=2, save_steps=1000, disable_tqdm=True)
    )
    trainer.train(data)
    return out


@pytest.fixture()
def choice(tiny_llama_dir, adapter) -> ModelChoice:
    return ModelChoice(str(tiny_llama_dir), str(adapter), "chatml")


def test_menus_offer_the_bundled_model_the_templates_and_the_demo_datasets():
    assert tasks.model_choices()[0] == BUNDLED_MODEL
    assert tasks.template_choices()[:2] == ["", "default"] and "chatml" in tasks.template_choices()
    assert {"shop_alpaca", "shop_sharegpt", "shop_test", "shop_dpo"} <= set(tasks.dataset_names(str(DEMO_DATA)))
    with pytest.raises(DatasetError, match="dataset_info.json does not exist. Fix: point dataset_dir"):
        tasks.dataset_names("no/such/folder")


def test_preview_shows_rows_as_training_reads_them():
    shown = json.loads(tasks.preview_rows(str(DEMO_DATA), ["shop_sharegpt"], stage="sft", rows=2))
    assert len(shown["shop_sharegpt"]) == 2
    assert shown["shop_sharegpt"][0]["messages"][-1]["role"] == "assistant"
    assert json.loads(tasks.preview_rows(str(DEMO_DATA), ["shop_dpo"], stage="dpo"))["shop_dpo"][0]["rejected"]
    with pytest.raises(ConfigError, match="no dataset chosen"):
        tasks.preview_rows(str(DEMO_DATA), [])
    with pytest.raises(DatasetError, match="is preference data .* Fix: choose a supervised dataset, or set stage: dpo"):
        tasks.preview_rows(str(DEMO_DATA), ["shop_dpo"], stage="sft")


def test_the_data_report_counts_rows_and_with_a_model_token_lengths(tiny_llama_dir):
    rows = tasks.data_report(str(DEMO_DATA), ["shop_alpaca"], None, 64)
    assert "shop_alpaca" in rows and "rows" in rows
    lengths = tasks.data_report(str(DEMO_DATA), ["shop_alpaca"], ModelChoice(str(tiny_llama_dir)), 64)
    assert lengths.startswith(f"Token lengths with the tokenizer of {tiny_llama_dir}") and "p50" in lengths


def test_predict_compares_the_base_and_the_tuned_model(choice, tmp_path):
    cache = ModelCache()
    shown = tasks.predict(
        cache,
        choice,
        str(DEMO_DATA),
        ["shop_test"],
        max_samples=2,
        max_new_tokens=4,
        batch_size=2,
        output_dir=str(tmp_path / "pred"),
        compare=True,
    )
    assert shown.markdown.startswith("#### Before / after\n")
    assert "| source | score | base | tuned | delta | n |" in shown.markdown
    assert "| shop_test | rouge-l |" in shown.markdown and "![" not in shown.markdown
    assert shown.figure is not None and shown.figure.axes[0].get_title() == "Before / after: what changed"
    assert (tmp_path / "pred" / "comparison.md").is_file()
    # both held: the base was loaded with the tuned model's template
    assert cache.held() == [choice.describe(), choice.model]
    alone = tasks.predict(cache, choice, str(DEMO_DATA), ["shop_test"], max_samples=1, max_new_tokens=2, batch_size=1)
    assert alone.markdown.startswith("| metric | score |\n|---|---|\n| rouge-1 |") and alone.figure is None
    with pytest.raises(OutputExistsError):  # earlier results are kept
        tasks.predict(
            cache,
            choice,
            str(DEMO_DATA),
            ["shop_test"],
            max_samples=1,
            max_new_tokens=2,
            batch_size=1,
            output_dir=str(tmp_path / "pred"),
            compare=True,
        )
    with pytest.raises(ConfigError, match="a before/after comparison needs an adapter"):
        tasks.predict(
            cache, choice.base, str(DEMO_DATA), ["shop_test"], max_samples=1, max_new_tokens=2, batch_size=1,
            compare=True,
        )  # fmt: skip


def test_benchmark_alone_and_before_and_after(choice):
    cache = ModelCache()
    alone = tasks.benchmark(cache, choice, "mmlu", str(BENCH / "mmlu"), n_shot=1)
    assert "mmlu_test: 1-shot, letter scoring" in alone.markdown and alone.figure is None
    shown = tasks.benchmark(cache, choice, "mmlu", str(BENCH / "mmlu"), n_shot=1, compare=True)
    assert "| mmlu_test | Average |" in shown.markdown and shown.figure is not None
    with pytest.raises(ConfigError, match="task_dir is empty"):
        tasks.benchmark(cache, choice, "mmlu", " ", n_shot=1)


def test_export_merges_and_refuses_to_write_over_a_folder(choice, tmp_path):
    cache = ModelCache()
    text = tasks.export(cache, choice, str(tmp_path / "merged"), export_size=1)
    assert text.startswith(f"Merged model written to {tmp_path / 'merged'}")
    assert (tmp_path / "merged" / "config.json").is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already holds files .* Fix: choose a new folder, or tick"):
        tasks.export(cache, choice, str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    with pytest.raises(OutputExistsError, match="already holds files"):  # an earlier export too, unless asked
        tasks.export(cache, choice, str(tmp_path / "merged"))
    assert tasks.export(cache, choice, str(tmp_path / "merged"), overwrite=True).startswith("Merged model")
    with pytest.raises(ConfigError, match="export_dir is empty"):
        tasks.export(cache, choice, "")


def test_chat_streams_the_growing_reply_through_the_models_stream(choice):
    cache = ModelCache()
    greedy = GenerationConfig(do_sample=False, max_new_tokens=6)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}]
    pieces = list(tasks.chat_reply(cache, choice, history, "运费多少钱？", system="be brief", generation=greedy))
    assert len(pieces) >= 2 and all(b.startswith(a) for a, b in zip(pieces, pieces[1:], strict=False))
    expected = cache.get(choice).chat(
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "运费多少钱？"},
        ],
        greedy,
        system="be brief",
    )
    assert pieces[-1] == expected


def test_a_model_choice_needs_a_model():
    with pytest.raises(ConfigError, match="no model chosen"):
        ModelChoice(" ")
    assert ModelChoice("m", " a, b ,", " chatml ") == ModelChoice("m", "a,b", "chatml")
