"""Streaming: rows read lazily, checked as they are met, tokenized exactly as the in-memory path."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from finetune_kit.data.conversations import ConversationStream
from finetune_kit.data.readers import iter_rows
from finetune_kit.data.registry import DatasetRegistry
from finetune_kit.data.stream import tokenize_stream
from finetune_kit.data.templates import get_template
from finetune_kit.data.tokenize import tokenize
from finetune_kit.errors import ConfigError, DatasetRowError


def rows(tag: str, n: int) -> list[dict]:
    return [{"instruction": f"{tag} question {i}", "output": f"{tag} answer {i}"} for i in range(n)]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows("a", 30)))
    (tmp_path / "b.json").write_text(json.dumps(rows("b", 5)))
    info = {"a": {"file_name": "a.jsonl"}, "b": {"file_name": "b.json"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    return tmp_path


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_jsonl_rows_are_read_one_line_at_a_time(folder: Path, monkeypatch):
    opened = []
    real_open = Path.open

    def spy(self, *args, **kwargs):
        handle = real_open(self, *args, **kwargs)
        opened.append(self.name)
        return handle

    monkeypatch.setattr(Path, "open", spy)
    monkeypatch.setattr(Path, "read_text", lambda *a, **k: pytest.fail("a stream must not read a file whole"))
    first = next(iter_rows(folder / "a.jsonl"))
    assert first == (str(folder / "a.jsonl"), 0, rows("a", 1)[0])
    assert "a.jsonl" in opened


def test_a_stream_yields_what_load_gives_and_can_be_read_again(folder: Path):
    registry = DatasetRegistry.from_dir(folder)
    stream = registry.stream("a,b", max_samples=10)
    assert isinstance(stream, ConversationStream) and stream.names == ("a", "b")
    loaded = registry.load("a,b", max_samples=10)
    assert list(stream) == list(loaded.examples)
    assert list(stream) == list(loaded.examples)  # a second pass reads the files again


def test_a_bad_row_raises_when_it_is_met_with_file_row_and_field(folder: Path):
    bad = rows("a", 3) + [{"instruction": "q"}] + rows("a", 2)
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    it = iter(DatasetRegistry.from_dir(folder).stream("a"))
    assert [next(it) for _ in range(3)]
    with pytest.raises(DatasetRowError) as err:
        next(it)
    assert (Path(err.value.file).name, err.value.row, err.value.field) == ("a.jsonl", 3, "output")


def test_skip_invalid_drops_and_logs_bad_rows_as_they_are_met(folder: Path, caplog):
    bad = rows("a", 2) + [{"instruction": "q"}] + rows("a", 2)
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    with caplog.at_level(logging.WARNING, logger="finetune_kit.data"):
        got = list(DatasetRegistry.from_dir(folder).stream("a", skip_invalid=True))
    assert len(got) == 4
    assert "row 2" in caplog.text and "output" in caplog.text


def test_interleaving_streams_stops_at_the_first_exhausted_or_repeats_until_all(folder: Path):
    registry = DatasetRegistry.from_dir(folder)
    under = list(registry.stream("a,b", mix_strategy="interleave_under", interleave_probs=[0.5, 0.5], seed=3))
    over = list(registry.stream("a,b", mix_strategy="interleave_over", interleave_probs=[0.5, 0.5], seed=3))
    assert under == list(registry.stream("a,b", mix_strategy="interleave_under", interleave_probs=[0.5, 0.5], seed=3))
    b_rows = [ex for ex in under if ex.messages[0]["content"].startswith("b")]
    assert len(b_rows) == 5 and len(under) < 35  # stopped when b ran out
    a_rows = {ex.messages[0]["content"] for ex in over if ex.messages[0]["content"].startswith("a")}
    assert len(a_rows) == 30  # went on until a ran out too, repeating b
    with pytest.raises(ConfigError):
        registry.stream("a,b", mix_strategy="interleave_under", interleave_probs=[0.9, 0.3])


def test_streamed_tokens_equal_the_loaded_ones(folder: Path, tok):
    registry = DatasetRegistry.from_dir(folder)
    chatml = get_template("chatml")
    stream = registry.stream("a,b", buffer_size=1)  # buffer 1: no shuffling, rows in order
    streamed = tokenize_stream(stream, tok, chatml, cutoff_len=24)
    loaded = tokenize(registry.load("a,b"), tok, chatml, cutoff_len=24)
    assert streamed.streaming and not loaded.streaming
    assert [r["input_ids"] for r in streamed.dataset] == loaded.dataset["input_ids"]
    assert [r["labels"] for r in streamed.dataset] == loaded.dataset["labels"]
    assert "streamed" in repr(streamed)


def test_the_shuffle_buffer_mixes_rows_but_keeps_them_all(folder: Path, tok):
    registry = DatasetRegistry.from_dir(folder)
    chatml = get_template("chatml")
    streamed = tokenize_stream(registry.stream("a", buffer_size=64, seed=1), tok, chatml, cutoff_len=64)
    loaded = tokenize(registry.load("a"), tok, chatml, cutoff_len=64)
    got = [tuple(r["input_ids"]) for r in streamed.dataset]
    want = [tuple(x) for x in loaded.dataset["input_ids"]]
    assert got != want and sorted(got) == sorted(want)
