"""Tokenizing in worker processes, batched, and once: the tokenized-data cache and tokenized_path."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest

from finetune_kit.data import batched as batched_module
from finetune_kit.data import encode as encode_module
from finetune_kit.data.cache import (
    TOKENIZED_RECORD,
    DataSelection,
    cache_key,
    load_tokenized,
    tokenize_cached,
    tokenized_cache_dir,
)
from finetune_kit.data.conversations import Conversations, Example
from finetune_kit.data.registry import DatasetRegistry
from finetune_kit.data.templates import get_template
from finetune_kit.data.tokenize import KTO_BATCH, encode_batch, fitted, tokenize
from finetune_kit.errors import DatasetError


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def chatml():
    return get_template("chatml")


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_KIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def examples(n: int, *, kto: bool = False, rejected: bool = False) -> Conversations:
    rows = []
    for i in range(n):
        turns = [{"role": "user", "content": f"Question {i}: how long does shipping take to city {i % 7}?"}]
        turns.append({"role": "assistant", "content": f"Reply {i}: about {i % 5 + 1} days. 亲，谢谢{i}"})
        if i % 3 == 0:
            turns = [{"role": "system", "content": "You are a shop assistant."}, *turns]
        extra = {"rejected": {"role": "assistant", "content": f"No idea {i}"}} if rejected else {}
        rows.append(Example(tuple(turns), f"mem, row {i}", kto_tag=(i % 2 == 0) if kto else None, **extra))
    return Conversations(tuple(rows), ("mem",))


def plain(items, tokenizer, template, **options):
    """The unbatched encoding of the whole list, as tokenize() did before workers and batching."""
    import datasets

    neat = options.get("neat_packing", False)
    packing = True if neat else options.get("packing")
    columns, truncated = encode_module._encode_all(
        list(items),
        fitted(tokenizer, template),
        template,
        options.get("stage", "sft"),
        options["cutoff_len"] - 1 if packing else options["cutoff_len"],  # LLaMA-Factory's packing budget
        options.get("train_on_prompt", False),
        options.get("mask_history", False),
        packing,
        neat,
    )
    return datasets.Dataset.from_dict(columns), truncated


def write_dataset(folder: Path, rows: list[dict]) -> DatasetRegistry:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "shop.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"shop": {"file_name": "shop.json"}}), encoding="utf-8")
    return DatasetRegistry.from_dir(folder)


ROWS = [{"instruction": f"Do you ship to {c}?", "input": "", "output": f"Yes, {c} in 3 days."} for c in "ABCDEFGH"]


# ----- workers and batching give the same rows ----------------------------------------------------
@pytest.mark.parametrize(
    ("stage", "options"),
    [
        ("sft", {}),
        ("sft", {"mask_history": True, "cutoff_len": 24}),
        ("sft", {"packing": True}),
        ("sft", {"neat_packing": True}),
        ("pt", {}),
        ("rm", {}),
        ("kto", {}),
    ],
)
def test_workers_and_batched_encoding_give_the_same_rows(tok, chatml, stage, options):
    data = examples(2 * KTO_BATCH + 300, kto=stage == "kto", rejected=stage == "rm")
    options = {"cutoff_len": 64, **options, "stage": stage}
    expected, truncated = plain(data, tok, chatml, **options)
    for workers in (1, 3):
        got = tokenize(data, tok, chatml, num_workers=workers, **options)
        if not options.get("neat_packing"):  # neat masks count examples: kept as int64, not narrowed to int8
            assert got.dataset.features == expected.features
        assert got.dataset.to_dict() == expected.to_dict(), f"num_workers={workers}"
        assert got.truncated == truncated
        assert got.names == ("mem",)


THOUGHTFUL = [
    {"role": "user", "content": "Is it in stock?"},
    {"role": "assistant", "content": "<think>\nCheck the shelf.\n</think>\n\nYes."},
    {"role": "user", "content": "Ship today?"},
    {"role": "assistant", "content": "Yes, before 5 pm."},
]


@pytest.mark.parametrize("name", ["qwen3", "llama3", None])
@pytest.mark.parametrize("mask_history", [False, True])
def test_batched_encoding_equals_per_text_encoding_for_other_templates(tok, name, mask_history):
    template = get_template(name, tok)
    if name == "llama3":
        fit = copy.deepcopy(tok)
        fit.add_special_tokens({"additional_special_tokens": ["<|eot_id|>", "<|eom_id|>"]})
        fit = fitted(fit, template)
    else:
        fit = fitted(tok, template)
    batch = [Example(tuple(THOUGHTFUL), f"row {i}") for i in range(3)] + list(examples(3))
    args = (template, "sft", 48, False, mask_history, None)
    assert encode_batch(batch, fit, *args) == encode_module._encode_all(batch, fit, *args)


def test_a_layout_asked_out_of_order_comes_from_the_template(tok, chatml):
    fit = fitted(tok, chatml)
    proxy, replay = batched_module.Prefetched(fit), batched_module.Replay(chatml)
    first = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    other = [{"role": "user", "content": "Price?"}, {"role": "assistant", "content": "9 yuan."}]
    replay.encode_pairs(proxy, first)
    proxy.prefetch()
    replay.fill = proxy.fill
    assert replay.encode_pairs(proxy, other) == chatml.encode_pairs(fit, other)
    assert replay.encode_pairs(proxy, first) == chatml.encode_pairs(fit, first)


def test_encode_batch_falls_back_to_the_plain_pass_to_report_a_bad_example(tok, chatml):
    bad = Example(({"role": "assistant", "content": "hi"}, {"role": "user", "content": "?"}), "bad.json, row 3")
    with pytest.raises(DatasetError, match="bad.json, row 3"):
        encode_batch([bad], fitted(tok, chatml), chatml, "sft", 64)


def test_num_workers_must_be_positive(tok, chatml):
    with pytest.raises(DatasetError, match="num_workers=0"):
        tokenize(examples(3), tok, chatml, cutoff_len=64, num_workers=0)


def test_no_examples_give_an_empty_dataset_with_the_stage_columns(tok, chatml):
    empty = tokenize([], tok, chatml, cutoff_len=64, num_workers=2)
    assert len(empty) == 0 and empty.dataset.column_names == ["input_ids", "attention_mask", "labels"]


# ----- the cache -----------------------------------------------------------------------------------
def test_a_second_run_is_read_from_the_cache(tok, chatml, cache_home, monkeypatch):
    data = examples(50)
    first = tokenize_cached(data, tok, chatml, cutoff_len=32, num_workers=2)
    folders = list((cache_home / "tokenized").iterdir())
    assert len(folders) == 1 and (folders[0] / TOKENIZED_RECORD).is_file()

    def fail(*args, **kwargs):
        raise AssertionError("encoded again")

    monkeypatch.setattr(encode_module, "_encode_all", fail)
    again = tokenize_cached(data, tok, chatml, cutoff_len=32)  # num_workers is not part of the key
    assert again.dataset.to_dict() == first.dataset.to_dict()
    assert (again.truncated, again.cutoff_len, again.template, again.names) == (first.truncated, 32, "chatml", ("mem",))
    assert again.tokenizer is not None


def test_the_cached_result_equals_tokenize(tok, chatml):
    data = examples(40)
    cached = tokenize_cached(data, tok, chatml, cutoff_len=24, train_on_prompt=True)
    direct = tokenize(data, tok, chatml, cutoff_len=24, train_on_prompt=True)
    assert cached.dataset.to_dict() == direct.dataset.to_dict()
    assert cached.dataset.features == direct.dataset.features
    assert (cached.truncated, cached.train_on_prompt, cached.stage) == (direct.truncated, True, "sft")


def test_the_key_changes_with_what_decides_the_tokens(tok, chatml):
    data = examples(5)
    fit = fitted(tok, chatml)
    base = cache_key(data, fit, chatml, cutoff_len=32, stage="sft")[0]
    assert base == cache_key(examples(5), fit, chatml, cutoff_len=32, stage="sft")[0]
    moved = Conversations(tuple(Example(ex.messages, "elsewhere.json") for ex in data), ("other",))
    assert cache_key(moved, fit, chatml, cutoff_len=32, stage="sft")[0] == base  # sources and names are not tokens
    edited = Conversations((*data.examples[:-1], examples(6).examples[-1]))
    grown = copy.deepcopy(fit)
    grown.add_tokens(["<new_token>"])
    others = {
        "data": cache_key(edited, fit, chatml, cutoff_len=32, stage="sft"),
        "options": cache_key(data, fit, chatml, cutoff_len=33, stage="sft"),
        "options ": cache_key(data, fit, chatml, cutoff_len=32, stage="sft", train_on_prompt=True),
        "template": cache_key(data, fit, chatml.with_default_system("Be brief."), cutoff_len=32, stage="sft"),
        "tokenizer": cache_key(data, grown, chatml, cutoff_len=32, stage="sft"),
    }
    base_parts = cache_key(data, fit, chatml, cutoff_len=32, stage="sft")[1]
    for what, (key, parts) in others.items():
        assert key != base, what
        assert [k for k in parts if parts[k] != base_parts[k]] == [what.strip()]


def test_an_interrupted_write_leaves_nothing_behind(tok, chatml, cache_home, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(encode_module, "_encode_all", boom)
    with pytest.raises(KeyboardInterrupt):
        tokenize_cached(examples(5), tok, chatml, cutoff_len=32)
    assert not list((cache_home / "tokenized").iterdir())


def test_cache_false_writes_nothing(tok, chatml, cache_home):
    got = tokenize_cached(examples(5), tok, chatml, cutoff_len=32, cache=False)
    assert len(got) == 5 and not (cache_home / "tokenized").exists()


def test_the_cache_lives_under_finetune_kit_cache(cache_home):
    assert tokenized_cache_dir() == cache_home / "tokenized"


# ----- DataSelection: a hit does not read the data ------------------------------------------------
def test_a_selection_hit_does_not_read_the_data(tok, chatml, tmp_path, monkeypatch):
    registry = write_dataset(tmp_path / "data", ROWS)
    selection = DataSelection(registry, "shop", max_samples=6)
    first = tokenize_cached(selection, tok, chatml, cutoff_len=64)
    assert len(first) == 6 and first.names == ("shop",)

    def fail(self, *args, **kwargs):
        raise AssertionError("read the data again")

    with monkeypatch.context() as m:
        m.setattr(DatasetRegistry, "load", fail)
        again = tokenize_cached(selection, tok, chatml, cutoff_len=64)
    assert again.dataset.to_dict() == first.dataset.to_dict()

    write_dataset(tmp_path / "data", [*ROWS[:5], {"instruction": "Changed?", "input": "", "output": "Yes."}])
    changed = tokenize_cached(selection, tok, chatml, cutoff_len=64)
    assert changed.dataset[5]["input_ids"] != first.dataset[5]["input_ids"]


def test_a_selection_loads_and_mixes_like_the_registry(tmp_path):
    registry = write_dataset(tmp_path / "data", ROWS)
    info = json.loads((tmp_path / "data" / "dataset_info.json").read_text())
    info["more"] = {"file_name": "more.json"}
    (tmp_path / "data" / "more.json").write_text(json.dumps(ROWS[:3]), encoding="utf-8")
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    registry = DatasetRegistry.from_dir(tmp_path / "data")
    assert list(DataSelection(registry, ("shop",)).load()) == list(registry.load("shop"))
    mixed = DataSelection(registry, "shop,more", mix_strategy="interleave_over", interleave_probs=(0.5, 0.5))
    expected = registry.load("shop,more", mix_strategy="interleave_over", interleave_probs=(0.5, 0.5))
    assert list(mixed.load()) == list(expected)
    reseeded = DataSelection(registry, "shop,more", mix_strategy="interleave_over", interleave_probs=(0.5, 0.5), seed=1)
    assert mixed.fingerprint() != reseeded.fingerprint()
    with pytest.raises(DatasetError, match="not in"):
        DataSelection(registry, "shopp")


def test_a_generator_of_examples_is_read_once(tok, chatml):
    got = tokenize_cached((ex for ex in examples(7)), tok, chatml, cutoff_len=32)
    assert len(got) == 7


# ----- tokenized_path (LLaMA-Factory's option) ----------------------------------------------------
def test_tokenized_path_is_written_then_loaded_as_it_is(tok, chatml, tmp_path, cache_home, caplog):
    path = tmp_path / "tokenized"
    first = tokenize_cached(examples(20), tok, chatml, cutoff_len=32, tokenized_path=path)
    assert (path / TOKENIZED_RECORD).is_file() and not (cache_home / "tokenized").exists()
    with caplog.at_level(logging.INFO, logger="finetune_kit.data"):
        again = tokenize_cached(examples(3), tok, chatml, cutoff_len=16, tokenized_path=path)
    assert again.dataset.to_dict() == first.dataset.to_dict()
    assert again.cutoff_len == 32
    assert "made from other data, options" in caplog.text and f"tokenized_path {path}" in caplog.text


def test_tokenized_path_written_by_llamafactory_is_loaded(tok, chatml, tmp_path):
    import datasets

    rows = {"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1, 1]], "labels": [[-100, 2, 3]]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "lf"))
    got = tokenize_cached(examples(3), tok, chatml, cutoff_len=16, tokenized_path=tmp_path / "lf")
    assert got.dataset.to_dict() == rows and got.cutoff_len == 16 and got.template == "chatml"


def test_a_folder_that_is_no_tokenized_dataset_is_an_error(tok, chatml, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(DatasetError, match="holds no tokenized dataset"):
        tokenize_cached(examples(3), tok, chatml, cutoff_len=16, tokenized_path=tmp_path / "notes")
    with pytest.raises(DatasetError, match=f"no {TOKENIZED_RECORD}"):
        load_tokenized(tmp_path / "notes")
