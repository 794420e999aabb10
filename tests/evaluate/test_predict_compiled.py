"""The static-cache prediction path (compiled on CUDA), forced on CPU: same replies as the continuous batch."""

from __future__ import annotations

import json

import pytest

from finetune_kit.data.registry import DatasetRegistry
from finetune_kit.errors import ConfigError, FinetuneKitWarning
from finetune_kit.evaluate import Evaluator, PredictConfig
from finetune_kit.evaluate import compiled as compiled_mod
from finetune_kit.evaluate.predict import generate_records
from finetune_kit.models.generation import GREEDY

GEN = GREEDY.with_(max_new_tokens=8)


@pytest.fixture(scope="module")
def shop8():
    data = DatasetRegistry.demo().load("shop_test").head(8)
    return data


@pytest.fixture(scope="module")
def continuous(tiny_llama, shop8):
    return generate_records(tiny_llama, shop8, GEN, batch_size=3, progress=False, backend="continuous")


@pytest.fixture(scope="module")
def unbatched(tiny_llama, shop8):
    return [c.text for c in tiny_llama.generate([e.prompt_messages for e in shop8.examples], GEN, batch_size=1)]


def test_the_demo_prompts_differ_in_length(tiny_llama, shop8):
    lengths = {len(tiny_llama.encode_prompt(e.prompt_messages)) for e in shop8.examples}
    assert len(lengths) > 3  # so sorting and padding are exercised


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_static_path_gives_the_continuous_and_unbatched_greedy_replies(
    tiny_llama, shop8, continuous, unbatched, batch_size
):
    records = generate_records(tiny_llama, shop8, GEN, batch_size=batch_size, progress=False, backend="static_compiled")
    assert records == continuous
    assert [r["predict"] for r in records] == unbatched
    assert [r["label"] for r in records] == [e.label for e in shop8.examples]


def test_stop_strings_cut_replies_as_generate_does(tiny_llama, shop8, unbatched):
    # a stop string taken from the middle of real replies, so it is certain to occur
    stop = [next(t for t in unbatched if len(t) >= 6)[2:4]]
    expected = [
        c.text for c in tiny_llama.generate([e.prompt_messages for e in shop8.examples], GEN, batch_size=1, stop=stop)
    ]
    assert any(len(e) < len(u) for e, u in zip(expected, unbatched, strict=True))
    for backend in ("static_compiled", "continuous"):
        records = generate_records(tiny_llama, shop8, GEN, batch_size=3, progress=False, backend=backend, stop=stop)
        assert [r["predict"] for r in records] == expected, backend


def test_records_reach_the_file_in_dataset_order(tiny_llama, shop8, continuous, tmp_path):
    report = (
        Evaluator(tiny_llama, generation=GEN)
        .with_config(per_device_eval_batch_size=3, predict_backend="static_compiled")
        .predict(shop8, output_dir=tmp_path / "out", progress=False)
    )
    lines = (tmp_path / "out" / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == continuous == list(report.records)
    saved = json.loads((tmp_path / "out" / "finetune_kit_predict.json").read_text())
    assert saved["config"]["predict"]["predict_backend"] == "static_compiled"


def test_auto_picks_the_continuous_batch_on_cpu(tiny_llama, shop8, continuous, monkeypatch):
    assert tiny_llama.device.type == "cpu"
    assert not compiled_mod.use_static(tiny_llama, GEN, "auto")
    assert compiled_mod.use_static(tiny_llama, GEN, "static_compiled")

    def refuse(*args, **kwargs):
        raise AssertionError("auto must not take the static path on CPU")

    monkeypatch.setattr(compiled_mod, "static_records", refuse)
    assert PredictConfig().predict_backend == "auto"
    report = (
        Evaluator(tiny_llama, generation=GEN).with_config(per_device_eval_batch_size=3).predict(shop8, progress=False)
    )
    assert list(report.records) == continuous


def test_forcing_the_static_path_where_it_cannot_run_is_an_error(tiny_llama, shop8):
    with pytest.raises(ConfigError, match="num_beams is 2"):
        generate_records(
            tiny_llama, shop8, GEN.with_(num_beams=2), batch_size=3, progress=False, backend="static_compiled"
        )
    assert not compiled_mod.use_static(tiny_llama, GEN.with_(num_beams=2), "auto")


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="predict_backend"):
        PredictConfig(predict_backend="fast")  # type: ignore[arg-type]


def test_a_compile_failure_falls_back_to_the_continuous_batch_with_a_warning(
    tiny_llama, shop8, continuous, monkeypatch, tmp_path
):
    import torch._dynamo.exc

    real = tiny_llama.model.generate
    calls = {"static": 0}

    def failing_after_one_batch(*args, **kwargs):
        if kwargs.get("cache_implementation") == "static":
            calls["static"] += 1
            if calls["static"] > 1:  # the second batch's compilation fails: the first batch is kept
                inner = RuntimeError("Cannot find a working triton installation")
                raise torch._dynamo.exc.BackendCompilerFailed(lambda: None, inner, None)
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny_llama.model, "generate", failing_after_one_batch)
    sink_path = tmp_path / "predictions.jsonl"
    with sink_path.open("w", encoding="utf-8") as sink, pytest.warns(FinetuneKitWarning, match="triton") as caught:
        records = generate_records(
            tiny_llama, shop8, GEN, batch_size=3, sink=sink, progress=False, backend="static_compiled"
        )
    assert "5 examples left" in str(caught[0].message)
    assert records == continuous
    lines = sink_path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == continuous


def test_other_errors_are_not_swallowed(tiny_llama, shop8, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("a bug, not a compilation")

    monkeypatch.setattr(tiny_llama.model, "generate", broken)
    with pytest.raises(ValueError, match="a bug"):
        generate_records(tiny_llama, shop8, GEN, batch_size=3, progress=False, backend="static_compiled")
