"""``finetune-kit train`` with LLaMA-Factory's data keys: streaming, mixing, skip_invalid and the tokenized cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_kit.cli.main import main

ROWS = [{"instruction": f"question {i}", "input": "", "output": f"answer {i}"} for i in range(8)]


@pytest.fixture()
def project(tmp_path: Path, lf_yaml, bundled_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    (data / "b.json").write_text(json.dumps([*ROWS[:3], {"instruction": "no output"}]), encoding="utf-8")
    info = {"a": {"file_name": "a.jsonl"}, "b": {"file_name": "b.json"}}
    (data / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    (tmp_path / "train.yaml").write_text(lf_yaml(data, tmp_path / "out"), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("finetune_kit.data.cache.tokenized_cache_dir", lambda: tmp_path / "cache" / "tokenized")
    return tmp_path


def quick(*extra: str) -> list[str]:
    return ["train", "train.yaml", "max_steps=1", "per_device_train_batch_size=4", "save_steps=1000", *extra]


def test_a_bad_row_stops_training_unless_skip_invalid(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(quick("dataset=a,b")) != 0
    assert "b.json, row 3, field 'output'" in capsys.readouterr().err
    assert main(quick("dataset=a,b", "skip_invalid=true", "output_dir=out2")) == 0
    assert (project / "out2" / "adapter_model.safetensors").is_file()


def test_streaming_mixing_and_the_cache(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(quick("dataset=a", "streaming=true", "output_dir=s")) == 0
    assert "streamed from a" in capsys.readouterr().out
    mixed = quick(
        "dataset=a,b",
        "skip_invalid=true",
        "mix_strategy=interleave_over",
        "interleave_probs=0.5,0.5",
        "overwrite_cache=false",  # LLaMA-Factory's example YAMLs (and this one) say true: tokenize anew
    )
    assert main([*mixed, "output_dir=m1", "preprocessing_num_workers=2"]) == 0
    assert "Saved tokenized data" in capsys.readouterr().err
    assert len(list((project / "cache" / "tokenized").iterdir())) == 1
    assert main([*mixed, "output_dir=m2"]) == 0  # the same data, tokenizer and options: read back
    assert "Loaded tokenized data from the cache" in capsys.readouterr().err
    assert main([*mixed, "output_dir=m3", "tokenized_path=tok"]) == 0
    assert (project / "tok").is_dir() and any((project / "tok").glob("*.arrow"))
