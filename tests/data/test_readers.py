"""Reading a dataset: files or the hub, LLaMA-Factory's num_samples then max_samples, every bad row checked."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from finetune_kit.data.conversations import Example
from finetune_kit.data.readers import check_dataset, read_dataset
from finetune_kit.data.registry import DatasetRegistry
from finetune_kit.data.spec import DatasetSpec
from finetune_kit.errors import DatasetError, DatasetRowError

GOOD = {"instruction": "Say hi", "input": "", "output": "hi"}
ROWS = [{"instruction": f"question {i}", "input": "", "output": f"answer {i}"} for i in range(6)]


def spec(**entry) -> DatasetSpec:
    return DatasetSpec.from_info("d", {"file_name": "rows.json", **entry})


def labels(examples: list[Example]) -> list[str]:
    return [ex.label for ex in examples]


def read_clean(spec: DatasetSpec, dataset_dir: Path, max_samples: int | None) -> list[Example]:
    """``read_dataset`` on data without bad rows: its examples, checking that no row was refused."""
    examples, bad = read_dataset(spec, dataset_dir, max_samples)
    assert bad == []
    return examples


@pytest.fixture()
def rows_dir(tmp_path: Path) -> Path:
    (tmp_path / "rows.json").write_text(json.dumps(ROWS), encoding="utf-8")
    return tmp_path


# ---------------------------------------------------------------------------------------------- read_dataset
def test_read_dataset_converts_every_row_and_names_its_source(rows_dir):
    examples, bad = read_dataset(spec(), rows_dir, None)
    assert bad == []
    assert all(isinstance(ex, Example) for ex in examples)
    assert labels(examples) == [f"answer {i}" for i in range(6)]
    assert examples[2].source == f"{rows_dir / 'rows.json'}, row 2"
    assert examples[2].messages == (
        {"role": "user", "content": "question 2"},
        {"role": "assistant", "content": "answer 2"},
    )


def test_read_dataset_max_samples_keeps_the_first_rows(rows_dir):
    assert labels(read_clean(spec(), rows_dir, 2)) == ["answer 0", "answer 1"]
    assert len(read_clean(spec(), rows_dir, 100)) == 6


def test_read_dataset_absolute_file_name_ignores_dataset_dir(rows_dir, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    examples = read_clean(spec(file_name=str(rows_dir / "rows.json")), elsewhere, None)
    assert len(examples) == 6


def test_read_dataset_num_samples_is_llamafactorys_seeded_sample(rows_dir):
    rows = list(range(6))
    fewer = labels(read_clean(spec(num_samples=4), rows_dir, None))
    assert fewer == [f"answer {i}" for i in random.Random(0).sample(rows, 4)]
    rng = random.Random(0)
    more = labels(read_clean(spec(num_samples=9), rows_dir, None))
    assert more == [f"answer {i}" for i in rows + [rng.choice(rows) for _ in range(3)]]
    assert labels(read_clean(spec(num_samples=4), rows_dir, 2)) == fewer[:2]  # sample, then truncate


def test_read_dataset_with_no_rows_is_an_error(tmp_path):
    (tmp_path / "rows.json").write_text("[]")
    with pytest.raises(DatasetError, match="dataset 'd' has no rows"):
        read_dataset(spec(), tmp_path, None)


def test_read_dataset_returns_the_good_rows_and_an_error_for_every_bad_one(tmp_path):
    rows = [GOOD, {"instruction": "q"}, {"output": 1}, {**GOOD, "output": "bye"}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    examples, bad = read_dataset(spec(), tmp_path, None)
    assert labels(examples) == ["hi", "bye"]
    assert all(isinstance(exc, DatasetRowError) for exc in bad)
    assert [(exc.file, exc.row, exc.field) for exc in bad] == [
        (str(tmp_path / "rows.json"), 1, "output"),
        (str(tmp_path / "rows.json"), 2, "instruction"),
    ]


def test_read_dataset_bad_rows_count_against_max_samples(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps([GOOD, {"instruction": "q"}, GOOD, {"instruction": "q"}]))
    examples, bad = read_dataset(spec(), tmp_path, 2)
    assert len(examples) == 1 and [exc.row for exc in bad] == [1]  # the first 2 rows, not 2 good ones


def test_read_dataset_kind_sets_what_a_row_must_hold(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps([{"instruction": "Some text."}]))
    examples, bad = read_dataset(spec(), tmp_path, None, kind="text")
    assert bad == [] and examples[0].text == "Some text."
    examples, bad = read_dataset(spec(), tmp_path, None)  # sft: the reply is missing
    assert examples == [] and [exc.field for exc in bad] == ["output"]


def test_read_dataset_refuses_preference_data_for_other_stages(rows_dir):
    with pytest.raises(DatasetError, match="preference data.*stage: dpo or rm"):
        read_dataset(spec(ranking=True), rows_dir, None)
    with pytest.raises(DatasetError, match="not preference data"):
        read_dataset(spec(), rows_dir, None, kind="pairwise")


def test_read_dataset_from_the_hub_passes_subset_folder_and_split(monkeypatch, tmp_path):
    import datasets

    calls = []

    def fake_load_dataset(url, **kwargs):
        calls.append((url, kwargs))
        return ROWS[:3]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = DatasetSpec.from_info("h", {"hf_hub_url": "org/rows", "subset": "zh", "folder": "v1", "split": "test"})
    examples = read_clean(hub, tmp_path, None)
    assert calls == [("org/rows", {"name": "zh", "data_dir": "v1", "split": "test"})]
    assert labels(examples) == ["answer 0", "answer 1", "answer 2"]
    assert examples[1].source == "org/rows, row 1"


def test_read_dataset_hub_failure_names_the_fix(monkeypatch, tmp_path):
    import datasets

    def fail(url, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    hub = DatasetSpec.from_info("h", {"hf_hub_url": "org/rows"})
    with pytest.raises(DatasetError) as err:
        read_dataset(hub, tmp_path, None)
    assert str(err.value) == (
        "dataset 'h': cannot load 'org/rows' from the hub (ConnectionError: offline). "
        "Fix: download the files and point file_name at them"
    )
    assert isinstance(err.value.__cause__, ConnectionError)


# ---------------------------------------------------------------------------------------------- check_dataset
def test_check_dataset_returns_every_bad_row(tmp_path):
    rows = [GOOD, {"instruction": "q"}, GOOD, {"instruction": "q", "output": 1}, "not an object", GOOD]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    spec = DatasetSpec.from_info("rows", {"file_name": "rows.json"})
    count, problems = check_dataset(spec, tmp_path)
    assert count == 6
    assert len(problems) == 3
    assert [p.split(", field")[0] for p in problems] == [f"{tmp_path / 'rows.json'}, row {i}" for i in (1, 3, 4)]


def test_check_dataset_on_clean_data_finds_nothing():
    registry = DatasetRegistry.demo()
    kinds = {"shop_dpo": "pairwise", "shop_kto": "kto", "shop_text": "text"}
    for name in registry.names:
        count, problems = check_dataset(registry.spec(name), registry.dataset_dir, kind=kinds.get(name, "sft"))
        assert count > 0 and problems == []


def test_check_dataset_reads_every_row_despite_num_samples(rows_dir):
    assert check_dataset(spec(num_samples=2), rows_dir) == (6, [])


def test_check_dataset_reports_each_bad_row_once_despite_num_samples(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps([GOOD, {"instruction": "q"}]))
    count, problems = check_dataset(spec(num_samples=8), tmp_path)  # oversampling repeats rows when loading
    assert count == 2
    assert [p.split(", field")[0] for p in problems] == [f"{tmp_path / 'rows.json'}, row 1"]


def test_check_dataset_kind_sets_what_a_row_must_hold(tmp_path):
    pairs = [{"instruction": "q", "chosen": "good", "rejected": "bad"}, {"instruction": "q", "chosen": "good"}]
    (tmp_path / "rows.json").write_text(json.dumps(pairs))
    count, problems = check_dataset(spec(ranking=True), tmp_path, kind="pairwise")
    assert count == 2
    assert [p.split(": ")[0] for p in problems] == [f"{tmp_path / 'rows.json'}, row 1, field 'rejected'"]


def test_check_dataset_leaves_hub_datasets_to_load_time(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("check_dataset must not download"))
    assert check_dataset(DatasetSpec.from_info("h", {"hf_hub_url": "org/rows"}), tmp_path) == (0, [])


def test_check_dataset_file_problems_still_raise(tmp_path):
    (tmp_path / "rows.json").write_text('[{"instruction": "a", "output": b}]')
    with pytest.raises(DatasetError, match="not valid JSON at line 1"):
        check_dataset(spec(), tmp_path)
