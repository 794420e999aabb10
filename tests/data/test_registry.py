"""DatasetRegistry: LLaMA-Factory's dataset_info.json read from disk, file types, limits and splits."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest

from finetune_kit.data.conversations import Conversations
from finetune_kit.data.registry import DatasetRegistry
from finetune_kit.errors import ConfigError, DatasetError, DatasetRowsError

ROWS = [{"instruction": f"question {i}", "input": "", "output": f"answer {i}"} for i in range(6)]


def qa(i: int) -> tuple[dict[str, str], dict[str, str]]:
    return ({"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"})


def key(ex) -> tuple[tuple[str, str], ...]:
    """A hashable view of an example's messages."""
    return tuple((m["role"], m["content"]) for m in ex.messages)


def qa_key(i: int) -> tuple[tuple[str, str], ...]:
    return (("user", f"question {i}"), ("assistant", f"answer {i}"))


def write_info(d: Path, info: dict) -> None:
    (d / "dataset_info.json").write_text(json.dumps(info, ensure_ascii=False, indent=2), encoding="utf-8")


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")


@pytest.fixture()
def files_dir(tmp_path: Path) -> Path:
    """The same six alpaca rows as .json, .jsonl, a folder of .jsonl, .csv and .parquet."""
    import datasets

    (tmp_path / "rows.json").write_text(json.dumps(ROWS), encoding="utf-8")
    write_jsonl(tmp_path / "rows.jsonl", ROWS)
    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts" / "a.jsonl", ROWS[:4])
    write_jsonl(tmp_path / "parts" / "b.jsonl", ROWS[4:])
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_csv(str(tmp_path / "rows.csv"), index=False)
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    write_info(
        tmp_path,
        {
            name: {"file_name": f}
            for name, f in [
                ("as_json", "rows.json"),
                ("as_jsonl", "rows.jsonl"),
                ("as_folder", "parts"),
                ("as_csv", "rows.csv"),
                ("as_parquet", "rows.parquet"),
            ]
        },
    )
    return tmp_path


@pytest.mark.parametrize("name", ["as_json", "as_jsonl", "as_folder", "as_csv", "as_parquet"])
def test_every_file_type_reads_the_same_rows(files_dir, name):
    conv = DatasetRegistry.from_dir(files_dir).load(name)
    assert isinstance(conv, Conversations)
    assert conv.names == (name,)
    assert [ex.messages for ex in conv.examples] == [qa(i) for i in range(6)]


def test_folder_rows_keep_file_order_and_name_their_file(files_dir):
    conv = DatasetRegistry.from_dir(files_dir).load("as_folder")
    assert conv[3].source == f"{files_dir / 'parts' / 'a.jsonl'}, row 3"
    assert conv[4].source == f"{files_dir / 'parts' / 'b.jsonl'}, row 0"


def test_folder_with_mixed_file_types_is_refused(tmp_path):
    (tmp_path / "mixed").mkdir()
    write_jsonl(tmp_path / "mixed" / "a.jsonl", ROWS)
    (tmp_path / "mixed" / "b.json").write_text(json.dumps(ROWS))
    write_info(tmp_path, {"mixed": {"file_name": "mixed"}})
    with pytest.raises(DatasetError, match="mixes file types"):
        DatasetRegistry.from_dir(tmp_path).load("mixed")


def test_missing_file_says_file_name_is_relative_to_dataset_dir(tmp_path):
    write_info(tmp_path, {"gone": {"file_name": "gone.json"}})
    with pytest.raises(DatasetError, match="does not exist.*relative to dataset_dir"):
        DatasetRegistry.from_dir(tmp_path).load("gone")


def test_columns_and_tags_remap_alpaca_and_openai_style_sharegpt(tmp_path):
    alpaca = [{"q": "Translate", "ctx": "bonjour", "a": "hello", "sys": "You translate.", "hist": [["hi", "hey"]]}]
    openai_style = [
        {
            "messages": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye!"},
            ]
        }
    ]
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca))
    write_jsonl(tmp_path / "chat.jsonl", openai_style)
    write_info(
        tmp_path,
        {
            "remapped": {
                "file_name": "alpaca.json",
                "columns": {"prompt": "q", "query": "ctx", "response": "a", "system": "sys", "history": "hist"},
            },
            "openai": {
                "file_name": "chat.jsonl",
                "formatting": "sharegpt",
                "columns": {"messages": "messages"},
                "tags": {
                    "role_tag": "role",
                    "content_tag": "content",
                    "user_tag": "user",
                    "assistant_tag": "assistant",
                    "system_tag": "system",
                },
            },
        },
    )
    registry = DatasetRegistry.from_dir(tmp_path)
    assert registry.names == ["remapped", "openai"]
    assert registry.load("remapped")[0].messages == (
        {"role": "system", "content": "You translate."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hey"},
        {"role": "user", "content": "Translate\nbonjour"},
        {"role": "assistant", "content": "hello"},
    )
    assert registry.load("openai")[0].messages == tuple(openai_style[0]["messages"])


def test_several_names_concatenate_and_max_samples_truncates_each(files_dir):
    registry = DatasetRegistry.from_dir(files_dir)
    conv = registry.load("as_json, as_csv", max_samples=2)
    assert conv.names == ("as_json", "as_csv")
    assert [ex.messages for ex in conv.examples] == [qa(0), qa(1), qa(0), qa(1)]
    assert len(registry.load(["as_json", "as_jsonl"], max_samples=100)) == 12


def test_num_samples_samples_and_oversamples(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    write_info(
        tmp_path,
        {"fewer": {"file_name": "rows.json", "num_samples": 3}, "more": {"file_name": "rows.json", "num_samples": 9}},
    )
    registry = DatasetRegistry.from_dir(tmp_path)
    fewer = [key(ex) for ex in registry.load("fewer").examples]
    assert len(fewer) == 3 and len(set(fewer)) == 3
    assert set(fewer) <= {qa_key(i) for i in range(6)}
    more = [key(ex) for ex in registry.load("more").examples]
    assert len(more) == 9
    assert set(more) == {qa_key(i) for i in range(6)}  # every row at least once, then repeats


def test_max_samples_truncates_after_num_samples_like_llamafactory(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    write_info(tmp_path, {"sampled": {"file_name": "rows.json", "num_samples": 4}})
    conv = DatasetRegistry.from_dir(tmp_path).load("sampled", max_samples=2)
    messages = [key(ex) for ex in conv.examples]
    assert len(messages) == 2  # LF: sample 4 of 6, then keep the first 2
    assert len(set(messages)) == 2


def test_unknown_name_suggests_the_close_one():
    registry = DatasetRegistry.demo()
    with pytest.raises(DatasetError) as err:
        registry.load("shop_alpca")
    assert "Did you mean 'shop_alpaca'?" in str(err.value)
    assert "shop_sharegpt" in str(err.value)  # and lists what is known


def test_empty_name_list_is_an_error():
    with pytest.raises(DatasetError, match="no dataset names"):
        DatasetRegistry.demo().load(" , ")


def test_demo_registry_loads():
    registry = DatasetRegistry.demo()
    assert registry.names == ["shop_alpaca", "shop_sharegpt", "shop_test", "shop_dpo", "shop_kto", "shop_text"]
    sharegpt = registry.load("shop_sharegpt")
    assert all(ex.messages[-1]["role"] == "assistant" for ex in sharegpt.examples)
    assert any(sum(m["role"] == "assistant" for m in ex.messages) > 1 for ex in sharegpt.examples)


def test_register_returns_a_new_registry(tmp_path):
    (tmp_path / "extra.json").write_text(json.dumps(ROWS))
    original = DatasetRegistry.demo()
    extended = original.register("extra", tmp_path / "extra.json")
    assert extended is not original
    assert "extra" in extended.names and "extra" not in original.names
    assert extended.names[: len(original.names)] == original.names
    assert [ex.messages for ex in extended.load("extra").examples] == [qa(i) for i in range(6)]
    with pytest.raises(DatasetError):
        original.spec("extra")


def test_register_relative_file_name_and_validation(tmp_path):
    (tmp_path / "extra.json").write_text(json.dumps(ROWS))
    registry = DatasetRegistry(dataset_dir=tmp_path).register("rel", "extra.json")
    assert len(registry.load("rel")) == 6
    with pytest.raises(ConfigError, match="formatting 'xml' is not supported"):
        registry.register("bad", "extra.json", formatting="xml")
    with pytest.raises(ConfigError, match="unknown columns key 'promt'"):
        registry.register("bad", "extra.json", columns={"promt": "q"})


def test_dataset_info_problems_are_reported_together(tmp_path):
    write_info(
        tmp_path,
        {
            "good": {"file_name": "a.json"},
            "typo": {"file_name": "a.json", "colums": {"prompt": "q"}},
            "fmt": {"file_name": "a.json", "formatting": "xml"},
            "ranked": {"file_name": "a.json", "ranking": "yes"},
            "preference": {"file_name": "a.json", "ranking": True, "columns": {"chosen": "c", "rejected": "r"}},
            "nowhere": {"formatting": "alpaca"},
            "badcols": {"file_name": "a.json", "columns": {"promt": "q"}, "tags": {"roletag": "r"}},
        },
    )
    with pytest.raises(ConfigError) as err:
        DatasetRegistry.from_dir(tmp_path)
    problems = err.value.problems
    assert len(problems) == 6
    text = str(err.value)
    assert str(tmp_path / "dataset_info.json") in text
    assert "'typo': unknown key 'colums'. Did you mean 'columns'?" in problems
    assert any("'fmt'" in p and "'xml'" in p for p in problems)
    assert "'ranked': ranking must be true or false, got 'yes'" in problems
    assert not any("'preference'" in p for p in problems)  # preference data is accepted now
    assert any("'nowhere'" in p and "no file_name" in p for p in problems)
    assert "'badcols': unknown columns key 'promt'. Did you mean 'prompt'?" in problems
    assert "'badcols': unknown tags key 'roletag'. Did you mean 'role_tag'?" in problems


def test_load_is_typed_as_conversations():
    assert typing.get_type_hints(DatasetRegistry.load)["return"] is Conversations


def test_check_counts_rows_and_lists_every_bad_one(tmp_path):
    rows = [ROWS[0], {"instruction": "q"}, ROWS[1], {"instruction": "q", "output": 1}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "clean.json").write_text(json.dumps(ROWS))
    write_info(
        tmp_path,
        {
            "rows": {"file_name": "rows.json", "num_samples": 2},
            "clean": {"file_name": "clean.json"},
            "hub": {"hf_hub_url": "org/rows"},
        },
    )
    registry = DatasetRegistry.from_dir(tmp_path)
    count, problems = registry.check("rows")
    assert count == 4
    assert [p.split(": ")[0] for p in problems] == [
        f"{tmp_path / 'rows.json'}, row {i}, field 'output'" for i in (1, 3)
    ]
    assert registry.check("clean") == (6, [])
    assert registry.check("hub") == (0, [])  # hub rows are checked when loaded
    with pytest.raises(DatasetError, match="Did you mean 'clean'"):
        registry.check("claen")


def test_load_and_check_read_rows_for_the_stage(tmp_path):
    pairs = [{"instruction": "q", "chosen": "good", "rejected": "bad"}, {"instruction": "q", "chosen": "good"}]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    write_info(tmp_path, {"pairs": {"file_name": "pairs.json", "ranking": True}, "rows": {"file_name": "rows.json"}})
    registry = DatasetRegistry.from_dir(tmp_path)
    count, problems = registry.check("pairs", stage="dpo")
    assert count == 2 and [p.split(": ")[0] for p in problems] == [
        f"{tmp_path / 'pairs.json'}, row 1, field 'rejected'"
    ]
    assert registry.load("rows", stage="pt")[0].text == "question 0"
    assert registry.load("rows", stage="ppo")[0].label == "answer 0"  # ppo reads supervised rows
    with pytest.raises(DatasetError, match="preference data.*stage: dpo or rm"):
        registry.check("pairs")
    with pytest.raises(DatasetError, match="'rows' is not preference data"):
        registry.load("rows", stage="rm")
    with pytest.raises(DatasetError, match="unknown stage 'dop'; expected one of pt, sft, ppo, rm, dpo, kto"):
        registry.load("rows", stage="dop")


def test_check_on_the_demo_finds_nothing():
    registry = DatasetRegistry.demo()
    stages = {"shop_dpo": "dpo", "shop_kto": "kto", "shop_text": "pt"}
    checked = [registry.check(name, stage=stages.get(name, "sft")) for name in registry.names]
    assert checked == [(150, []), (30, []), (30, []), (50, []), (100, []), (42, [])]


def test_dataset_info_file_problems(tmp_path):
    with pytest.raises(DatasetError, match="dataset_info.json does not exist"):
        DatasetRegistry.from_dir(tmp_path)
    (tmp_path / "dataset_info.json").write_text('{\n  "a": {"file_name": "a.json"},\n}')
    with pytest.raises(DatasetError, match="not valid JSON at line 3"):
        DatasetRegistry.from_dir(tmp_path)
    (tmp_path / "dataset_info.json").write_text("[]")
    with pytest.raises(DatasetError, match="expected an object"):
        DatasetRegistry.from_dir(tmp_path)


@pytest.fixture(scope="module")
def demo() -> Conversations:
    return DatasetRegistry.demo().load("shop_alpaca")


def _key(conv: Conversations) -> list[str]:
    return [ex.source for ex in conv.examples]


@pytest.mark.parametrize(("val_size", "n_val"), [(0.2, 30), (0.1, 15), (7, 7), (1.0, 1)])
def test_split_sizes_are_disjoint_and_complete(demo, val_size, n_val):
    assert len(demo) == 150
    train, val = demo.split(val_size)
    assert len(val) == n_val and len(train) == 150 - n_val
    assert set(_key(train)).isdisjoint(_key(val))
    assert sorted(_key(train) + _key(val)) == sorted(_key(demo))
    assert train.names == val.names == demo.names


def test_split_is_deterministic_for_a_seed(demo):
    a_train, a_val = demo.split(0.2, seed=1)
    b_train, b_val = demo.split(0.2, seed=1)
    c_train, c_val = demo.split(0.2, seed=2)
    assert _key(a_val) == _key(b_val) and _key(a_train) == _key(b_train)
    assert _key(a_val) != _key(c_val)
    assert _key(a_val) != _key(demo)[:30]  # shuffled, not the first rows


@pytest.mark.parametrize("val_size", [0.0, 150, 500])
def test_split_that_leaves_a_side_empty_is_refused(demo, val_size):
    with pytest.raises(DatasetError, match="at least one row on each side"):
        demo.split(val_size)


@pytest.mark.parametrize(("n", "val_size", "n_val"), [(20, 0.01, 1), (10, 0.25, 3)])
def test_split_fraction_rounds_up_like_llamafactory(demo, n, val_size, n_val):
    train, val = demo.head(n).split(val_size)
    assert (len(train), len(val)) == (n - n_val, n_val)


def test_conversations_iterate_over_their_examples(demo):
    assert list(demo.head(3)) == list(demo.examples[:3])
    assert [ex.source for ex in demo][:2] == _key(demo)[:2]


def test_load_mixes_datasets_by_strategy_and_keeps_every_bad_row_in_one_error(tmp_path: Path):
    def rows(tag: str, n: int) -> list[dict]:
        return [{"instruction": f"{tag}{i}", "output": "ok"} for i in range(n)]

    (tmp_path / "a.json").write_text(json.dumps(rows("a", 6)))
    (tmp_path / "b.json").write_text(json.dumps(rows("b", 2)))
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"a": {"file_name": "a.json"}, "b": {"file_name": "b.json"}})
    )
    registry = DatasetRegistry.from_dir(tmp_path)
    first = lambda conv: [ex.messages[0]["content"] for ex in conv]  # noqa: E731
    assert first(registry.load("a,b")) == [f"a{i}" for i in range(6)] + ["b0", "b1"]
    under = registry.load("a,b", mix_strategy="interleave_under", interleave_probs=[0.5, 0.5], seed=1)
    over = registry.load("a,b", mix_strategy="interleave_over", interleave_probs=[0.5, 0.5], seed=1)
    assert under.names == ("a", "b") and "b1" in first(under)  # stops when b, the shorter, runs out
    assert first(under) == first(
        registry.load("a,b", mix_strategy="interleave_under", interleave_probs=[0.5, 0.5], seed=1)
    )
    assert len(over) > len(under) and set(first(over)) == {f"a{i}" for i in range(6)} | {"b0", "b1"}
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": "x"}, *rows("b", 1)]))
    (tmp_path / "a.json").write_text(json.dumps([*rows("a", 1), {"output": "y"}]))
    with pytest.raises(DatasetRowsError) as err:
        registry.load("a,b", mix_strategy="interleave_under", interleave_probs=[0.5, 0.5])
    assert sorted((Path(e.file).name, e.row) for e in err.value.rows) == [("a.json", 1), ("b.json", 0)]
