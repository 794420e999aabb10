"""``finetune-kit data check``: a training YAML gives the token-length report and its files; a folder, the rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_kit.cli.main import main
from finetune_kit.data.report import REPORT_JSON, REPORT_PLOT

SHOP = [
    {"instruction": "你们包邮吗？", "input": "", "output": "全场满九十九元包邮，不满九十九元收取八元运费。"},
    {"instruction": "多久发货？", "input": "", "output": "付款后四十八小时内发货，节假日顺延。"},
    {"instruction": "Do you offer free shipping?", "input": "", "output": "Shipping is free on orders over 99 yuan."},
    {"instruction": "List the numbers.", "input": "", "output": " ".join(str(i) for i in range(300))},  # > cutoff_len
]
BAD_ROW = {"instruction": "发票怎么开？", "input": ""}  # no output


@pytest.fixture()
def project(tmp_path: Path, lf_yaml, bundled_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data folder and an LLaMA-Factory training YAML (bundled model, chatml, cutoff_len 256); cwd is tmp_path."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "shop.json").write_text(json.dumps(SHOP, ensure_ascii=False), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"shop": {"file_name": "shop.json"}}), encoding="utf-8")
    (tmp_path / "train.yaml").write_text(lf_yaml(data, tmp_path / "saves" / "shop"), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_yaml_prints_the_report_and_writes_its_files(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", "train.yaml"]) == 0
    out = capsys.readouterr().out
    assert "tokenizer of bundled:smollm2-135m-instruct" in out
    assert "template chatml, cutoff_len 256, train_on_prompt false, mask_history false" in out
    row = next(line for line in out.splitlines() if line.startswith("shop "))
    assert row.split()[:3] == ["shop", "4", "0"] and row.split()[7] == "1"  # one example truncated
    assert "all rows are valid" in out
    record = json.loads((project / REPORT_JSON).read_text(encoding="utf-8"))
    shop = record["datasets"][0]
    assert record["model"] == "bundled:smollm2-135m-instruct" and record["cutoff_len"] == 256
    assert shop["truncated"] == 1 and shop["trained_tokens_lost"] == max(shop["lengths"]) - 256
    assert (project / REPORT_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (project / "saves").exists()  # training refuses a non-empty output_dir: nothing is written there


def test_a_bad_row_fails_the_check(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "data" / "shop.json").write_text(json.dumps([*SHOP, BAD_ROW], ensure_ascii=False), encoding="utf-8")
    assert main(["data", "check", "train.yaml", "cutoff_len=64"]) == 1
    captured = capsys.readouterr()
    assert "cutoff_len 64" in captured.out
    assert f"{project / 'data' / 'shop.json'}, row 4, field 'output'" in captured.out
    assert "1 rows need fixing" in captured.err
    record = json.loads((project / REPORT_JSON).read_text(encoding="utf-8"))
    assert record["bad_count"] == 1 and "row 4, field 'output'" in record["datasets"][0]["bad_rows"][0]


def test_dataset_dir_form_checks_rows_only(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", "data", "--dataset", "shop"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "shop: 4 rows, ok"
    assert not (project / REPORT_JSON).exists() and not (project / REPORT_PLOT).exists()
    (project / "data" / "shop.json").write_text(json.dumps([BAD_ROW, *SHOP], ensure_ascii=False), encoding="utf-8")
    assert main(["data", "check", "data"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "shop: 5 rows, 1 bad rows" and "row 0, field 'output'" in out[1]


def test_yaml_keys_are_checked_all_at_once(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", "train.yaml", "lora_rnk=4", "cutoff_len=1"]) == 1
    err = capsys.readouterr().err
    assert "Did you mean 'lora_rank'" in err and "cutoff_len: got 1" in err
    assert not (project / REPORT_JSON).exists()


def test_help_lists_the_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: finetune-kit data check CONFIG.yaml | DATASET_DIR")
    assert "--cutoff_len" in out and "--model_name_or_path" in out and "--dataset_dir" in out
