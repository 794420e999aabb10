"""DatasetSpec.from_info: one dataset_info.json entry, every problem reported at once, formats from the registry."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_kit.data import spec as spec_module
from finetune_kit.data.conversations import Example
from finetune_kit.data.formats import FORMATS, PLANNED_FORMATS
from finetune_kit.data.registry import DatasetRegistry
from finetune_kit.data.spec import COLUMN_DEFAULTS, TAG_DEFAULTS, DatasetSpec
from finetune_kit.errors import ConfigError


def problems(entry, name: str = "d") -> list[str]:
    with pytest.raises(ConfigError) as err:
        DatasetSpec.from_info(name, entry)
    return err.value.problems


def test_a_valid_entry_keeps_what_it_reads():
    spec = DatasetSpec.from_info(
        "d",
        {
            "file_name": "d.json",
            "formatting": "sharegpt",
            "columns": {"messages": "m"},
            "tags": {"role_tag": "role"},
            "split": "test",
            "subset": "zh",
            "folder": "v1",
            "num_samples": 3,
            "file_sha1": "ignored",
        },
    )
    assert (spec.name, spec.file_name, spec.formatting) == ("d", "d.json", "sharegpt")
    assert (spec.split, spec.subset, spec.folder, spec.num_samples) == ("test", "zh", "v1", 3)
    assert dict(spec.columns) == {"messages": "m"} and dict(spec.tags) == {"role_tag": "role"}


def test_defaults_are_llamafactorys():
    spec = DatasetSpec.from_info("d", {"file_name": "d.json", "columns": None, "tags": None})
    assert (spec.formatting, spec.split, spec.subset, spec.num_samples) == ("alpaca", "train", None, None)
    assert {k: spec.column(k) for k in COLUMN_DEFAULTS} == COLUMN_DEFAULTS
    assert {k: spec.tag(k) for k in TAG_DEFAULTS} == TAG_DEFAULTS
    assert spec.column("history") == "history"  # an unmapped optional column keeps its own name


def test_columns_and_tags_override_the_defaults():
    spec = DatasetSpec.from_info("d", {"file_name": "d.json", "columns": {"prompt": "q"}, "tags": {"user_tag": "u"}})
    assert (spec.column("prompt"), spec.column("response")) == ("q", "output")
    assert (spec.tag("user_tag"), spec.tag("assistant_tag")) == ("u", "gpt")


def test_every_problem_of_one_entry_is_reported_together():
    found = problems(
        {
            "script_url": "x.py",
            "formatting": "xml",
            "ranking": 1,
            "colums": {},
            "columns": {"promt": "q", "images": "img"},
            "tags": {"roletag": "r"},
        }
    )
    assert found == [
        "'d': unknown key 'colums'. Did you mean 'columns'?",
        "'d': 'script_url' datasets are not supported yet; download the file and use file_name",
        "'d': formatting 'xml' is not supported; use alpaca, openai or sharegpt",
        "'d': ranking must be true or false, got 1",
        "'d': unknown columns key 'promt'. Did you mean 'prompt'?",
        "'d': the 'images' column (images, videos, audios: multimodal data) is not supported; remove it from columns",
        "'d': unknown tags key 'roletag'. Did you mean 'role_tag'?",
    ]


def test_tool_and_preference_columns_are_kept_and_media_columns_refused():
    columns = {"tools": "fns", "chosen": "good", "rejected": "bad", "kto_tag": "label"}
    spec = DatasetSpec.from_info("d", {"file_name": "d.json", "columns": columns})
    assert {k: spec.column(k) for k in columns} == columns
    for key in ("images", "videos", "audios"):
        assert problems({"file_name": "d.json", "columns": {key: "x"}}) == [
            f"'d': the '{key}' column (images, videos, audios: multimodal data) is not supported; "
            "remove it from columns"
        ]


def test_the_error_names_where_the_entry_came_from():
    with pytest.raises(ConfigError) as err:
        DatasetSpec.from_info("d", {"formatting": "alpaca"}, "data/dataset_info.json")
    assert str(err.value) == (
        "Invalid data/dataset_info.json: 'd': no file_name (or hf_hub_url / ms_hub_url) says where its rows are"
    )


def test_an_entry_that_is_not_an_object():
    with pytest.raises(ConfigError, match="entry 'd' must be an object, got list"):
        DatasetSpec.from_info("d", ["d.json"])


# ---------------------------------------------------------------------------------------------- formatting
def test_formatting_names_come_from_the_format_registry():
    assert set(FORMATS) == {"alpaca", "sharegpt", "openai"}
    assert PLANNED_FORMATS == ()
    for name in FORMATS:
        assert DatasetSpec.from_info("d", {"file_name": "d.json", "formatting": name}).formatting == name


def test_unknown_formatting_lists_the_registered_names(monkeypatch):
    assert problems({"file_name": "d.json", "formatting": "xml"}) == [
        "'d': formatting 'xml' is not supported; use alpaca, openai or sharegpt"
    ]
    assert problems({"file_name": "d.json", "formatting": ["alpaca"]}) == [
        "'d': formatting ['alpaca'] is not supported; use alpaca, openai or sharegpt"
    ]
    monkeypatch.setattr(spec_module, "PLANNED_FORMATS", ("xml",))  # none is planned today; the hint stays
    assert problems({"file_name": "d.json", "formatting": "xml"}) == [
        "'d': formatting 'xml' is not supported (the xml format is planned); use alpaca, openai or sharegpt"
    ]


def test_a_format_registered_in_one_place_is_accepted_and_read(monkeypatch, tmp_path: Path):
    kinds = []

    def to_example(row, spec, where, kind):
        kinds.append(kind)
        messages = ({"role": "user", "content": row["q"]}, {"role": "assistant", "content": row["a"]})
        return Example(messages, f"{where[0]}, row {where[1]}")

    monkeypatch.setitem(FORMATS, "qa", to_example)
    assert "use alpaca, openai, qa or sharegpt" in problems({"file_name": "d.json", "formatting": "csv"})[0]
    (tmp_path / "d.json").write_text(json.dumps([{"q": "hi", "a": "hello"}]))
    registry = DatasetRegistry(dataset_dir=tmp_path).register("d", "d.json", formatting="qa")
    assert registry.spec("d").formatting == "qa"
    assert registry.load("d")[0].messages == (
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    )
    registry.load("d", stage="pt")
    assert kinds == ["sft", "text"]  # the converter is told what the stage needs


# ---------------------------------------------------------------------------------------------- sources
def test_ranking_is_kept():
    assert DatasetSpec.from_info("d", {"file_name": "d.json"}).ranking is False
    assert DatasetSpec.from_info("d", {"file_name": "d.json", "ranking": False}).ranking is False
    assert DatasetSpec.from_info("d", {"file_name": "d.json", "ranking": True}).ranking is True
    assert problems({"file_name": "d.json", "ranking": "true"}) == ["'d': ranking must be true or false, got 'true'"]


def test_ms_hub_url_is_checked_but_not_kept():
    assert "ms_hub_url" not in {f.name for f in dataclasses.fields(DatasetSpec)}
    spec = DatasetSpec.from_info("d", {"file_name": "d.json", "ms_hub_url": "org/d"})
    assert spec.file_name == "d.json" and spec.hf_hub_url is None
    spec = DatasetSpec.from_info("d", {"hf_hub_url": "org/d", "ms_hub_url": "org/d"})
    assert spec.hf_hub_url == "org/d"


def test_ms_hub_url_alone_is_not_supported_yet():
    assert problems({"ms_hub_url": "org/d"}) == [
        "'d': 'ms_hub_url' datasets are not supported yet; download the file and use file_name"
    ]


@pytest.mark.parametrize("key", ["om_hub_url", "script_url", "cloud_file_name"])
def test_other_sources_are_not_supported_yet(key):
    assert problems({key: "x", "file_name": "d.json"}) == [
        f"'d': '{key}' datasets are not supported yet; download the file and use file_name"
    ]


@pytest.mark.parametrize(
    "first",
    [
        "finetune_kit.data.spec",
        "finetune_kit.data.formats.sharegpt",
        "finetune_kit.data.readers",
        "finetune_kit.data.registry",
    ],
)
def test_data_modules_import_in_any_order(first):
    """spec.py imports the format registry; the formats name DatasetSpec for types only, so no order breaks."""
    code = f"import {first}; import finetune_kit.data.registry"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
