"""Evaluator.compare and `finetune-kit eval --compare`: base and tuned model on the same benchmark and data."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from finetune_kit import Comparison, ConfigError, DatasetRegistry, Evaluator, LoraTrainer, OutputExistsError
from finetune_kit.cli.main import main
from finetune_kit.evaluate import BenchmarkConfig, ComparisonRow
from finetune_kit.evaluate.compare import dataset_names

BENCH = Path(__file__).parent / "benchmarks"
MINI = Path(__file__).parents[2] / "finetune_kit" / "data" / "demo" / "mmlu_mini"
SETTINGS = {"n_shot": 2, "batch_size": 4, "progress": False}


@pytest.fixture(scope="module")
def shop_test():
    return DatasetRegistry.demo().load("shop_test").head(4)


@pytest.fixture(scope="module")
def tuned(tiny_llama, tmp_path_factory):
    """A LoRA adapter trained for a few steps with a high learning rate, so the tiny model's answers change."""
    train = DatasetRegistry.demo().load("shop_alpaca").head(16)
    out = tmp_path_factory.mktemp("compare") / "lora"
    return (
        LoraTrainer(tiny_llama)
        .with_lora(lora_rank=4)
        .with_data(cutoff_len=64)
        .with_training(
            output_dir=str(out),
            learning_rate=5e-2,
            max_steps=4,
            per_device_train_batch_size=4,
            save_steps=1000,
            disable_tqdm=True,
        )  # fmt: skip
        .train(train)
    )


@pytest.fixture(scope="module")
def compared(tiny_llama, tuned, shop_test, tmp_path_factory):
    save = tmp_path_factory.mktemp("compare") / "out"
    bench = BenchmarkConfig(task="mmlu_test", task_dir=str(BENCH), n_shot=2, batch_size=4)
    comparison = Evaluator.compare(
        tiny_llama, tuned, benchmarks=[bench], datasets=[shop_test], save_dir=save, progress=False
    )
    return comparison, save


def test_each_side_equals_its_own_run(compared, tiny_llama, tuned, shop_test):
    comparison, _ = compared
    base_bench = Evaluator(tiny_llama).benchmark("mmlu_test", task_dir=BENCH, n_shot=2, batch_size=4, progress=False)
    tuned_bench = Evaluator(tuned).benchmark("mmlu_test", task_dir=BENCH, n_shot=2, batch_size=4, progress=False)
    base_pred = Evaluator(tiny_llama).predict(shop_test, progress=False)
    tuned_pred = Evaluator(tuned).predict(shop_test, progress=False)
    rows = {(r.source, r.metric): r for r in comparison.rows}
    assert rows["mmlu_test", "Average"].base == pytest.approx(base_bench.accuracy)
    assert rows["mmlu_test", "Average"].tuned == pytest.approx(tuned_bench.accuracy)
    for category, value in tuned_bench.categories.items():
        assert rows["mmlu_test", category].tuned == pytest.approx(value)
        assert rows["mmlu_test", category].count == tuned_bench.counts[category]
    for key in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
        assert rows["shop_test", key].base == pytest.approx(base_pred.scores[key])
        assert rows["shop_test", key].tuned == pytest.approx(tuned_pred.scores[key])
        assert rows["shop_test", key].count == 4
    assert all(r.delta == pytest.approx(r.tuned - r.base) for r in comparison.rows)
    # the adapter really changed the model, so the comparison is not of one model with itself
    assert [r["predict"] for r in base_pred.records] != [r["predict"] for r in tuned_pred.records]


def test_files_are_written_per_side_and_for_the_comparison(compared):
    comparison, save = compared
    assert comparison.save_dir == save
    for side in ("base", "tuned"):
        assert (save / side / "mmlu_test" / "results.log").is_file()
        assert (save / side / "shop_test" / "generated_predictions.jsonl").is_file()
    saved = json.loads((save / "comparison.json").read_text())
    assert [(r["source"], r["metric"]) for r in saved["rows"]] == [(r.source, r.metric) for r in comparison.rows]
    table = (save / "comparison.md").read_text()
    for r in comparison.rows:
        assert f"| {r.source} | {r.metric} | {r.base:.2f} | {r.tuned:.2f} | {r.delta:+.2f} |" in table
    assert "![differences](comparison.png)" in table
    png = (save / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width == 700 and height >= 100 * (1.2 + 0.32 * len(comparison.rows)) - 1


def test_notebook_display_has_table_and_inline_chart(compared):
    comparison, _ = compared
    page = comparison._repr_html_()
    assert "data:image/png;base64," in page and page.count("<tr>") == len(comparison.rows) + 1
    assert "comparison.png" not in comparison._repr_markdown_()
    assert "mmlu_test Average" in repr(comparison) and "shop_test rouge-l" in repr(comparison)


def test_adapter_folder_as_tuned_gives_the_same_scores(compared, tiny_llama, tuned, shop_test):
    comparison, _ = compared
    again = Evaluator.compare(
        tiny_llama,
        tuned.output_dir,
        benchmarks={"mmlu_test": BENCH},
        datasets=shop_test,
        progress=False,
    )
    # mapping form: default settings (5-shot), so only the dataset rows are comparable
    rows = {(r.source, r.metric): r.tuned for r in comparison.rows if r.source == "shop_test"}
    assert rows == {(r.source, r.metric): r.tuned for r in again.rows if r.source == "shop_test"}
    assert again.save_dir is None
    assert str(tuned.output_dir) in again.tuned_name


def test_everything_is_checked_before_any_run(tiny_llama, tuned, shop_test, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("earlier results")
    with pytest.raises(OutputExistsError, match="not empty"):
        Evaluator.compare(tiny_llama, tuned, datasets=[shop_test], save_dir=tmp_path / "full", progress=False)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep.txt"]
    with pytest.raises(ConfigError, match="needs something to score"):
        Evaluator.compare(tiny_llama, tuned)
    twice = BenchmarkConfig(task="mmlu_test", task_dir=str(BENCH))
    with pytest.raises(ConfigError, match="listed twice"):
        Evaluator.compare(tiny_llama, tuned, benchmarks=[twice, twice.with_(n_shot=0)])
    with pytest.raises(TypeError, match="expected loaded Conversations"):
        Evaluator.compare(tiny_llama, tuned, datasets=["shop_test"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="BenchmarkConfig objects or a task -> task_dir mapping"):
        Evaluator.compare(tiny_llama, tuned, benchmarks=["mmlu_test"])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        Evaluator.compare(tiny_llama, tmp_path, datasets=[shop_test])


def test_duplicate_dataset_names_are_kept_apart_and_mismatched_runs_refused(tiny_llama, shop_test):
    assert list(dataset_names([shop_test, shop_test.head(2)])) == ["shop_test", "shop_test_1"]
    result = Evaluator(tiny_llama).benchmark("mmlu_test", task_dir=BENCH, **SETTINGS)
    other = Evaluator(tiny_llama).benchmark("mmlu_test", task_dir=BENCH, n_shot=0, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="same task, split, n_shot and scoring"):
        Comparison.of("a", "b", benchmarks=[(result, other)])
    same = Comparison.of("a", "b", benchmarks=[(result, result)])
    assert [r.metric for r in same.rows] == ["Average", *result.categories]
    assert all(isinstance(r, ComparisonRow) and r.delta == 0 for r in same.rows)


def test_save_never_overwrites_an_earlier_comparison(tiny_llama, tmp_path):
    result = Evaluator(tiny_llama).benchmark("mmlu_test", task_dir=BENCH, **SETTINGS)
    comparison = Comparison.of("a", "b", benchmarks=[(result, result)])
    comparison.save(tmp_path)
    before = (tmp_path / "comparison.md").read_text()
    with pytest.raises(OutputExistsError, match="comparison"):
        comparison.save(tmp_path)
    assert (tmp_path / "comparison.md").read_text() == before


def test_cli_compare_writes_the_report(tiny_llama_dir, tuned, tmp_path, capsys):
    save = tmp_path / "cmp"
    demo = Path(__file__).parents[2] / "finetune_kit" / "data" / "demo"
    args = [
        "eval",
        f"model_name_or_path={tiny_llama_dir}",
        "template=chatml",
        "infer_dtype=float32",
        "--compare",
        str(tuned.output_dir),
        "task=mmlu_test",
        f"task_dir={BENCH}",
        "n_shot=2",
        f"dataset_dir={demo}",
        "eval_dataset=shop_test",
        "max_samples=3",
        "max_new_tokens=8",
        f"save_dir={save}",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mmlu_test Average" in out and "shop_test bleu-4" in out
    assert {p.name for p in save.iterdir()} == {"base", "tuned", "comparison.md", "comparison.png", "comparison.json"}
    rows = json.loads((save / "comparison.json").read_text())["rows"]
    assert {r["count"] for r in rows if r["source"] == "shop_test"} == {3}


def test_cli_compare_problems_are_reported_together(tiny_llama_dir, tuned, tmp_path, capsys):
    base = ["eval", f"model_name_or_path={tiny_llama_dir}", "--compare", str(tuned.output_dir)]
    assert main(base) == 1
    err = capsys.readouterr().err
    assert "needs something to score" in err and "save_dir: saves/compare" in err
    assert main([*base, "eval_dataset=shop_test", f"save_dir={tmp_path}/a", f"output_dir={tmp_path}/b"]) == 1
    assert "differ" in capsys.readouterr().err


@pytest.mark.slow
def test_bundled_model_compare_on_the_demo_question_set(bundled_model, shop_test, tmp_path):
    """The shipped mmlu_mini set in MMLU's layout: both sides score all 90 test questions."""
    comparison = Evaluator.compare(
        bundled_model,
        bundled_model,
        benchmarks=[BenchmarkConfig.demo(n_shot=0)],
        datasets=[shop_test.head(2)],
        progress=False,
    )
    assert BenchmarkConfig.demo().task_dir == str(MINI)
    average = next(r for r in comparison.rows if r.metric == "Average")
    assert average.count == 90 and average.delta == 0
    assert 0 < average.base < 100
