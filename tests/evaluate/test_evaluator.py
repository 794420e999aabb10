"""Evaluator.predict: LLaMA-Factory's prediction files, streamed writes, overwrite safety, batching."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from finetune_kit.data.registry import DatasetRegistry
from finetune_kit.errors import ConfigError, DatasetError, OutputExistsError
from finetune_kit.evaluate import EVAL_GENERATION, EvalReport, Evaluator, PredictConfig
from finetune_kit.evaluate.metrics import SCORE_KEYS
from finetune_kit.models.batching import BatchScheduler

RESULT_KEYS = {f"predict_{k}" for k in SCORE_KEYS} | {
    "predict_samples",
    "predict_runtime",
    "predict_samples_per_second",
}


@pytest.fixture(scope="module")
def shop_test():
    return DatasetRegistry.demo().load("shop_test")


@pytest.fixture(scope="module")
def predicted(tiny_llama, shop_test, tmp_path_factory):
    """One short prediction run of the tiny model on 5 rows, in batches of 2 (the last one partial)."""
    out = tmp_path_factory.mktemp("predict") / "out"
    evaluator = Evaluator(tiny_llama).with_generation(max_new_tokens=6).with_config(per_device_eval_batch_size=2)
    report = evaluator.predict(shop_test.head(5), output_dir=out, progress=False)
    return report, out


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_jsonl_has_one_record_per_example_with_the_dataset_labels(predicted, shop_test):
    report, out = predicted
    rows = _lines(out / "generated_predictions.jsonl")
    assert len(rows) == 5
    assert [r["label"] for r in rows] == [e.label for e in shop_test.head(5).examples]
    assert all(set(r) == {"prompt", "predict", "label"} for r in rows)
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") for r in rows)
    assert all(e.prompt_messages[-1]["content"] in r["prompt"] for r, e in zip(rows, shop_test.examples, strict=False))
    assert list(report.records) == rows
    assert not (out / "generated_predictions.jsonl.tmp").exists()


def test_jsonl_keeps_chinese_readable(predicted):
    _, out = predicted
    text = (out / "generated_predictions.jsonl").read_text(encoding="utf-8")
    assert "星辰小铺" in text  # ensure_ascii=False: not \u661f\u8fb0...


def test_predict_results_json_has_llamafactory_keys(predicted):
    report, out = predicted
    results = json.loads((out / "predict_results.json").read_text())
    assert set(results) == RESULT_KEYS
    assert results["predict_samples"] == 5 == report.num_samples
    assert results["predict_runtime"] > 0
    for key in SCORE_KEYS:
        assert results[f"predict_{key}"] == report.scores[key]
        assert 0 <= report.scores[key] <= 100
    assert RESULT_KEYS <= set(json.loads((out / "all_results.json").read_text()))
    run = json.loads((out / "finetune_kit_predict.json").read_text())
    assert run["kind"] == "predict" and run["config"]["generation"]["max_new_tokens"] == 6
    assert run["config"]["generation"]["do_sample"] is False


def test_report_repr_table_and_scores_match_records(predicted):
    from finetune_kit.evaluate import generation_scores

    report, out = predicted
    assert report.output_dir == out
    assert report.scores == generation_scores(
        [r["predict"] for r in report.records], [r["label"] for r in report.records]
    )
    text = repr(report)
    assert "\n" not in text and text.startswith("EvalReport(5 samples")
    for key in SCORE_KEYS:
        assert f"{key}={report.scores[key]:.2f}" in text
        assert key in report.table()
    assert len(report.example_scores()) == 5


def test_refuses_to_overwrite_earlier_predictions(predicted, tiny_llama, shop_test):
    _, out = predicted
    before = (out / "generated_predictions.jsonl").read_bytes()
    evaluator = Evaluator(tiny_llama).with_generation(max_new_tokens=2)
    with pytest.raises(OutputExistsError, match="overwrite_output_dir=True"):
        evaluator.predict(shop_test.head(1), output_dir=out, progress=False)
    assert (out / "generated_predictions.jsonl").read_bytes() == before


def test_overwrite_when_asked(tiny_llama, shop_test, tmp_path):
    evaluator = Evaluator(tiny_llama).with_generation(max_new_tokens=2).with_config(output_dir=tmp_path)
    evaluator.predict(shop_test.head(3), progress=False)
    evaluator.with_config(overwrite_output_dir=True).predict(shop_test.head(1), progress=False)
    assert len(_lines(tmp_path / "generated_predictions.jsonl")) == 1
    assert json.loads((tmp_path / "predict_results.json").read_text())["predict_samples"] == 1


def test_predictions_are_streamed_batch_by_batch(tiny_llama, shop_test, tmp_path, monkeypatch):
    """A crash when the fifth prompt joins the batch leaves the first four predictions on disk (LF writes only
    at the end)."""
    original = BatchScheduler._prefill
    calls = []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # one sequence at a time: the fifth prompt joins after the first four ended
            raise RuntimeError("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BatchScheduler, "_prefill", flaky)
    evaluator = Evaluator(tiny_llama).with_generation(max_new_tokens=2).with_config(per_device_eval_batch_size=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluator.predict(shop_test.head(6), output_dir=tmp_path, progress=False)
    partial = tmp_path / "generated_predictions.jsonl.tmp"
    assert [r["label"] for r in _lines(partial)] == [e.label for e in shop_test.head(4).examples]
    assert not (tmp_path / "generated_predictions.jsonl").exists()


def test_batch_size_does_not_change_greedy_predictions(tiny_llama, shop_test):
    """Prompts of different lengths are left-padded together; padding must not leak into the output."""
    data = shop_test.head(8)
    assert len({len(tiny_llama.encode_prompt(e.prompt_messages)) for e in data.examples}) > 1
    evaluator = Evaluator(tiny_llama).with_generation(max_new_tokens=10)
    one = evaluator.with_config(per_device_eval_batch_size=1).predict(data, progress=False)
    four = evaluator.with_config(per_device_eval_batch_size=4).predict(data, progress=False)
    assert [r["predict"] for r in one.records] == [r["predict"] for r in four.records]
    assert all(r["predict"] for r in one.records)
    assert one.output_dir is None


def test_max_samples_limits_the_examples(tiny_llama, shop_test):
    report = (
        Evaluator(tiny_llama)
        .with_generation(max_new_tokens=2)
        .with_config(max_samples=3)
        .predict(shop_test, progress=False)
    )
    assert report.num_samples == len(report.records) == 3
    assert [r["label"] for r in report.records] == [e.label for e in shop_test.head(3).examples]


def test_empty_dataset_is_refused_before_generating(tiny_llama, shop_test):
    with pytest.raises(DatasetError, match="no examples"):
        Evaluator(tiny_llama).predict(shop_test.head(0))


def test_default_generation_is_greedy_128_and_with_returns_new_evaluators(tiny_llama):
    evaluator = Evaluator(tiny_llama)
    assert evaluator.generation == EVAL_GENERATION
    assert evaluator.generation.greedy and evaluator.generation.max_new_tokens == 128
    sampled = evaluator.with_generation(do_sample=True)
    assert not sampled.generation.greedy and evaluator.generation.greedy
    smaller = evaluator.with_config(per_device_eval_batch_size=2)
    assert smaller.config.per_device_eval_batch_size == 2 and evaluator.config.per_device_eval_batch_size == 8
    assert smaller.model is evaluator.model
    assert "greedy" in repr(evaluator) and "max_new_tokens=128" in repr(evaluator)
    assert "sampling" in repr(sampled) and "\n" not in repr(sampled)
    assert "batch size:  2" in smaller.explain()
    with pytest.raises(ConfigError, match="per_device_eval_batch_sise"):
        evaluator.with_config(per_device_eval_batch_sise=2)


def test_accepts_anything_with_load(tiny_llama):
    class FakeTrainResult:
        def load(self):
            return tiny_llama

    assert Evaluator(FakeTrainResult()).model is tiny_llama
    with pytest.raises(TypeError, match="LoadedModel or something with .load"):
        Evaluator("not a model")  # type: ignore[arg-type]


def test_predict_config_validation():
    with pytest.raises(ConfigError, match="LLaMA-Factory requires predict_with_generate: true to save predictions"):
        PredictConfig(predict_with_generate=False)
    with pytest.raises(ConfigError) as info:
        PredictConfig(per_device_eval_batch_size=0, max_samples=0)
    assert len(info.value.problems) == 2
    assert PredictConfig(output_dir=Path("a/b")).output_dir == "a/b"
    assert PredictConfig(max_samples="10").max_samples == 10  # YAML/CLI text is coerced
    assert PredictConfig.section == "predict"


def _report(values: dict[str, float], n: int = 4) -> EvalReport:
    return EvalReport(scores=values, records=(), output_dir=None, num_samples=n, runtime_s=1.0)


def test_compare_prints_before_after_and_delta():
    before = _report({"rouge-1": 10.0, "rouge-2": 2.5, "rouge-l": 8.0, "bleu-4": 5.0})
    after = _report({"rouge-1": 35.25, "rouge-2": 12.5, "rouge-l": 30.0, "bleu-4": 4.0})
    lines = after.compare(before).splitlines()
    assert lines[0].split() == ["metric", "before", "after", "delta"]
    assert lines[1].split() == ["rouge-1", "10.0000", "35.2500", "+25.2500"]
    assert lines[4].split() == ["bleu-4", "5.0000", "4.0000", "-1.0000"]
    assert "different sample counts" in after.compare(_report(before.scores, n=3))


@pytest.mark.slow
def test_bundled_model_predicts_on_shop_test(bundled_model, shop_test, tmp_path):
    report = (
        Evaluator(bundled_model)
        .with_generation(max_new_tokens=48)
        .with_config(per_device_eval_batch_size=3)
        .predict(shop_test.head(6), output_dir=tmp_path, progress=False)
    )
    assert report.num_samples == 6
    assert all(r["predict"].strip() for r in report.records)
    for key in SCORE_KEYS:
        assert math.isfinite(report.scores[key]) and 0 <= report.scores[key] <= 100
    assert report.scores["bleu-4"] > 0 or report.scores["rouge-1"] > 0
    assert len(_lines(tmp_path / "generated_predictions.jsonl")) == 6
