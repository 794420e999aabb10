"""Dataset reports: exact percentiles, truncation and trained-token counts, every bad row, the histogram."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from finetune_kit.data.registry import DatasetRegistry
from finetune_kit.data.report import DataReport, DatasetReport, build_report, check_rows, percentile
from finetune_kit.data.templates import get_template
from finetune_kit.data.tokenize import tokenize
from finetune_kit.errors import ConfigError, DatasetError

CUTOFF = 48
SHORT = [
    {"instruction": f"Question {i}?", "input": "", "output": "Yes." if i % 2 else "No, not today."} for i in range(5)
]
# A short prompt and a reply far longer than CUTOFF: LLaMA-Factory's rule keeps the prompt and cuts the reply.
LONG = {"instruction": "Count.", "input": "", "output": " ".join(str(i) for i in range(200))}
BAD = [
    {"instruction": "Fine?", "input": "", "output": "Fine."},
    {"instruction": "Empty answer", "input": "", "output": ""},
    {"instruction": "Fine again?", "input": "", "output": "Yes."},
    {"instruction": "No answer column", "input": ""},
]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def chatml(tokenizer):
    return get_template("chatml", tokenizer)


def write(d: Path, files: dict[str, list], extra: dict | None = None) -> DatasetRegistry:
    d.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        (d / f"{name}.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    info = {name: {"file_name": f"{name}.json"} for name in files} | (extra or {})
    (d / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return DatasetRegistry.from_dir(d)


@pytest.fixture()
def registry(tmp_path: Path) -> DatasetRegistry:
    return write(tmp_path / "data", {"short": SHORT, "mixed": [*SHORT, LONG], "bad": BAD})


def full_lengths(data, tokenizer, template) -> list[int]:
    """Untruncated lengths straight from the library's encoder, the oracle the report must agree with."""
    return [len(x) for x in tokenize(data, tokenizer, template, cutoff_len=10**9).dataset["input_ids"]]


# ------------------------------------------------------------------ percentiles
@pytest.mark.parametrize(
    "values",
    [[7], [1, 2, 3, 4, 10], [10, 1, 4, 3, 2, 8], list(range(1, 101)), [5, 5, 5, 900]],
)
@pytest.mark.parametrize("q", [0, 50, 90, 99, 100])
def test_percentile_equals_numpy(values: list[int], q: int) -> None:
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_by_hand() -> None:
    assert percentile([1, 2, 3, 4, 10], 50) == 3
    assert percentile([1, 2, 3, 4, 10], 90) == pytest.approx(7.6)  # rank 3.6: 4 + 0.6 * (10 - 4)
    with pytest.raises(ValueError):
        percentile([], 50)


# ------------------------------------------------------------------ lengths, truncation, trained tokens
def test_lengths_and_percentiles_match_the_encoder(registry, tokenizer, chatml) -> None:
    report = build_report(registry, "short,mixed", tokenizer, chatml, cutoff_len=CUTOFF)
    short = report["short"]
    expected = full_lengths(registry.load("short"), tokenizer, chatml)
    assert short.lengths == tuple(expected) and short.examples == short.rows == 5
    for q, got in ((50, short.p50), (90, short.p90), (99, short.p99)):
        assert got == pytest.approx(float(np.percentile(expected, q)))
    assert short.max_length == max(expected) < CUTOFF
    assert (short.truncated, short.trained_tokens_lost) == (0, 0)
    assert short.tokens == sum(expected)
    assert 0 < short.trained_fraction < 1
    assert short.not_measured is None and short.bad_rows == ()


def test_a_row_over_cutoff_len_is_counted_exactly(registry, tokenizer, chatml) -> None:
    mixed = build_report(registry, ["mixed"], tokenizer, chatml, cutoff_len=CUTOFF)["mixed"]
    lengths = full_lengths(registry.load("mixed"), tokenizer, chatml)
    long_len = lengths[-1]
    assert long_len > 3 * CUTOFF and max(lengths[:-1]) < CUTOFF
    assert mixed.truncated == 1
    assert mixed.max_length == long_len and mixed.p99 < long_len
    # The long row keeps exactly CUTOFF tokens; its prompt is short, so every token cut was a trained reply token.
    assert mixed.tokens == sum(lengths[:-1]) + CUTOFF
    assert mixed.trained_tokens_lost == long_len - CUTOFF
    untruncated = tokenize(registry.load("mixed"), tokenizer, chatml, cutoff_len=10**9)
    assert mixed.trained_tokens == untruncated.num_trained_tokens - (long_len - CUTOFF)
    assert mixed.trained_fraction == pytest.approx(mixed.trained_tokens / mixed.tokens)


def test_train_on_prompt_trains_every_token(registry, tokenizer, chatml) -> None:
    mixed = build_report(registry, "mixed", tokenizer, chatml, cutoff_len=CUTOFF, train_on_prompt=True)["mixed"]
    assert mixed.trained_fraction == 1.0 and mixed.trained_tokens == mixed.tokens
    assert mixed.trained_tokens_lost == mixed.max_length - CUTOFF


def test_max_samples_measures_the_first_rows(registry, tokenizer, chatml) -> None:
    report = build_report(registry, "mixed", tokenizer, chatml, cutoff_len=CUTOFF, max_samples=2)
    assert report["mixed"].rows == 6 and report["mixed"].examples == 2 and report["mixed"].truncated == 0
    assert report.max_samples == 2 and "first 2 rows" in report.format()


def test_encoding_settings_are_checked(registry, tokenizer, chatml) -> None:
    with pytest.raises(ConfigError, match="cutoff_len"):
        build_report(registry, "short", tokenizer, chatml, cutoff_len=1)
    with pytest.raises(ConfigError, match="pick one"):
        build_report(registry, "short", tokenizer, chatml, cutoff_len=64, train_on_prompt=True, mask_history=True)
    with pytest.raises(ConfigError, match="max_samples"):
        build_report(registry, "short", tokenizer, chatml, cutoff_len=64, max_samples=0)
    with pytest.raises(DatasetError, match="Did you mean 'short'"):
        build_report(registry, "shrot", tokenizer, chatml, cutoff_len=64)


# ------------------------------------------------------------------ bad rows
def test_every_bad_row_is_reported_with_file_row_and_field(registry, tokenizer, chatml) -> None:
    bad = build_report(registry, "bad", tokenizer, chatml, cutoff_len=CUTOFF)["bad"]
    assert bad.rows == 4 and bad.bad_count == 2
    assert [p.split(": ", 1)[0] for p in bad.bad_rows] == [
        f"{registry.dataset_dir / 'bad.json'}, row 1, field 'output'",
        f"{registry.dataset_dir / 'bad.json'}, row 3, field 'output'",
    ]
    assert bad.bad_rows == tuple(registry.check("bad")[1])
    # Measured over the good rows where the registry can skip bad ones, else not at all, saying why.
    if bad.lengths is None:
        assert "2 bad rows" in bad.not_measured
    else:
        assert bad.examples == 2


def test_bad_rows_are_skipped_for_lengths_when_load_can(tmp_path, tokenizer, chatml) -> None:
    reg = write(tmp_path / "data", {"bad": BAD, "good_twin": [BAD[0], BAD[2]]})
    bad = build_report(reg, "bad", tokenizer, chatml, cutoff_len=CUTOFF)["bad"]
    assert bad.bad_count == 2 and bad.examples == 2 and bad.not_measured is None
    assert bad.lengths == tuple(full_lengths(reg.load("good_twin"), tokenizer, chatml))


def test_hub_datasets_are_not_downloaded(tmp_path, tokenizer, chatml) -> None:
    reg = write(tmp_path / "data", {"short": SHORT}, {"hub": {"hf_hub_url": "org/not-downloaded"}})
    report = build_report(reg, reg.names, tokenizer, chatml, cutoff_len=CUTOFF)
    assert report["hub"].rows == 0 and report["hub"].lengths is None and "hub dataset" in report["hub"].not_measured
    assert report.bad_count == 0


# ------------------------------------------------------------------ output: text, JSON, PNG
def test_table_json_and_repr(registry, tokenizer, chatml) -> None:
    report = build_report(registry, "short,mixed", tokenizer, chatml, cutoff_len=CUTOFF)
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == f"template chatml, cutoff_len {CUTOFF}, train_on_prompt false, mask_history false"
    assert lines[1].split() == [
        "dataset",
        "rows",
        "bad",
        "p50",
        "p90",
        "p99",
        "max",
        "truncated",
        "trained",
        "lost",
        "trained",
    ]
    mixed_row = lines[3].split()
    assert mixed_row[:3] == ["mixed", "6", "0"] and mixed_row[6:9] == [
        str(report["mixed"].max_length),
        "1",
        str(report["mixed"].trained_tokens_lost),
    ]
    data = json.loads(json.dumps(report.to_dict()))
    assert data["template"] == "chatml" and data["cutoff_len"] == CUTOFF and data["bad_count"] == 0
    assert data["datasets"][1]["truncated"] == 1 and data["datasets"][1]["lengths"] == list(report["mixed"].lengths)
    assert repr(report) == f"DataReport(2 datasets, 11 rows, 0 bad, template=chatml, cutoff_len={CUTOFF})"
    assert repr(report["mixed"]).startswith("DatasetReport('mixed', 6 rows, 0 bad, p50=")


def test_rows_only_report_keeps_the_data_check_format(registry) -> None:
    report = check_rows(registry, registry.names)
    assert report.template is None and not report.measured and report.bad_count == 2
    lines = report.format().splitlines()
    assert lines[:3] == ["short: 5 rows, ok", "mixed: 6 rows, ok", "bad: 4 rows, 2 bad rows"]
    assert len(lines) == 5 and lines[3].startswith("  ") and "row 1, field 'output'" in lines[3]
    with pytest.raises(DatasetError, match="no dataset of this report has token lengths"):
        report.histogram(Path("never.png"))


def test_long_problem_lists_are_cut_in_text_only() -> None:
    many = DatasetReport("big", 80, tuple(f"f.json, row {i}, field 'output': empty" for i in range(60)))
    report = DataReport((many,))
    lines = report.format().splitlines()
    assert len(lines) == 1 + 50 + 1 and lines[-1] == "  ... and 10 more"
    assert len(report.to_dict()["datasets"][0]["bad_rows"]) == 60


def test_histogram_is_a_png(registry, tokenizer, chatml, tmp_path) -> None:
    import matplotlib.image

    report = build_report(registry, "short,mixed,bad", tokenizer, chatml, cutoff_len=CUTOFF)
    path = report.histogram(tmp_path / "plots" / "data_report.png")
    assert path == tmp_path / "plots" / "data_report.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
