"""Tool-calling, preference, KTO and pre-training rows; every bad row of a load in one error, or skipped and logged."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from finetune_kit.data.conversations import Conversations
from finetune_kit.data.registry import DatasetRegistry
from finetune_kit.errors import DatasetError, DatasetRowError, DatasetRowsError

TOOLS = [
    {
        "name": "track_order",
        "description": "Where an order is",
        "parameters": {"type": "object", "properties": {"order": {"type": "integer"}}, "required": ["order"]},
    }
]
OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "system_tag": "system",
}


def write_dir(d: Path, datasets: dict[str, tuple[list, dict]]) -> DatasetRegistry:
    """Write ``{name: (rows, entry)}`` as ``name.json`` files plus their dataset_info.json."""
    info = {}
    for name, (rows, entry) in datasets.items():
        (d / f"{name}.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
        info[name] = {"file_name": f"{name}.json", **entry}
    (d / "dataset_info.json").write_text(json.dumps(info, ensure_ascii=False, indent=2), encoding="utf-8")
    return DatasetRegistry.from_dir(d)


def load(tmp_path: Path, rows: list, *, stage: str = "sft", **entry) -> Conversations:
    return write_dir(tmp_path, {"d": (rows, entry)}).load("d", stage=stage)


def row_errors(tmp_path: Path, rows: list, *, stage: str = "sft", **entry) -> list[DatasetRowError]:
    """The bad rows of one dataset, each checked to name its file and its fix."""
    with pytest.raises(DatasetRowsError) as err:
        load(tmp_path, rows, stage=stage, **entry)
    for exc in err.value.rows:
        assert exc.file == str(tmp_path / "d.json")
        assert str(exc).startswith(f"{exc.file}, row {exc.row}, field '{exc.field}': ")
        assert "Fix: " in str(exc)
    return list(err.value.rows)


def turn(role: str, text: str) -> dict[str, str]:
    return {"from": role, "value": text}


# ---------------------------------------------------------------------------------------------- openai tools
def test_openai_tool_calls_become_a_function_turn_and_tool_results_one_observation(tmp_path):
    calls = [
        {"id": "a", "type": "function", "function": {"name": "track_order", "arguments": '{"order": 7}'}},
        {"id": "b", "type": "function", "function": {"name": "track_order", "arguments": '{"order": 8}'}},
    ]
    row = {
        "messages": [
            {"role": "system", "content": "You help shoppers."},
            {"role": "user", "content": "Where are orders 7 and 8?"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": "a", "content": '{"status": "shipped"}'},
            {"role": "tool", "tool_call_id": "b", "content": '{"status": "packed"}'},
            {"role": "assistant", "content": "Order 7 has shipped; order 8 is packed."},
        ],
        "tools": json.dumps(TOOLS),
    }
    conv = load(
        tmp_path, [row], formatting="openai", columns={"messages": "messages", "tools": "tools"}, tags=OPENAI_TAGS
    )
    ex = conv[0]
    assert ex.messages == (
        {"role": "system", "content": "You help shoppers."},
        {"role": "user", "content": "Where are orders 7 and 8?"},
        {"role": "function", "content": json.dumps([c["function"] for c in calls])},
        {
            "role": "observation",
            "content": '{"status": "shipped"}\n</tool_response>\n<tool_response>\n{"status": "packed"}',
        },
        {"role": "assistant", "content": "Order 7 has shipped; order 8 is packed."},
    )
    assert json.loads(ex.tools) == TOOLS
    assert ex.label == "Order 7 has shipped; order 8 is packed."


def test_openai_tool_call_with_non_ascii_arguments_is_kept_readable(tmp_path):
    call = {"type": "function", "function": {"name": "track_order", "arguments": '{"note": "naïve"}'}}
    row = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
        ]
    }
    conv = load(tmp_path, [row], formatting="openai", columns={"messages": "messages"}, tags=OPENAI_TAGS)
    assert conv[0].messages[-1] == {"role": "function", "content": json.dumps([call["function"]], ensure_ascii=False)}
    assert "naïve" in conv[0].messages[-1]["content"]


def test_openai_single_tool_result_is_not_joined(tmp_path):
    call = {"type": "function", "function": {"name": "track_order", "arguments": "{}"}}
    row = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "only result"},
            {"role": "assistant", "content": "done"},
        ]
    }
    conv = load(tmp_path, [row], formatting="openai", columns={"messages": "messages"}, tags=OPENAI_TAGS)
    assert conv[0].messages[2] == {"role": "observation", "content": "only result"}


def test_openai_malformed_tool_calls_is_a_row_error(tmp_path):
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": ["x"]}]}
    [exc] = row_errors(tmp_path, [row], formatting="openai", columns={"messages": "messages"}, tags=OPENAI_TAGS)
    assert (exc.row, exc.field) == (0, "messages[1].tool_calls")


def test_tool_calls_are_plain_keys_in_sharegpt_rows(tmp_path):
    """Only ``formatting: openai`` reads ``tool_calls``; sharegpt keeps the message's own content."""
    call = {"type": "function", "function": {"name": "track_order", "arguments": "{}"}}
    row = {"conversations": [turn("human", "q"), {"from": "gpt", "value": "text", "tool_calls": [call]}]}
    conv = load(tmp_path, [row], formatting="sharegpt")
    assert conv[0].messages[-1] == {"role": "assistant", "content": "text"}


# ---------------------------------------------------------------------------------------------- sharegpt tools
def test_sharegpt_tools_column_as_a_json_string_or_a_list(tmp_path):
    conversation = [
        turn("human", "Where is order 7?"),
        turn("function_call", '{"name": "track_order", "arguments": {"order": 7}}'),
        turn("observation", '{"status": "shipped"}'),
        turn("gpt", "It has shipped."),
    ]
    rows = [
        {"conversations": conversation, "tools": json.dumps(TOOLS)},
        {"conversations": conversation, "tools": TOOLS},
        {"conversations": conversation[:1] + conversation[-1:]},  # a row without tools
        {"conversations": conversation[:1] + conversation[-1:], "tools": ""},
    ]
    conv = load(tmp_path, rows, formatting="sharegpt", columns={"tools": "tools"})
    assert conv[0].tools == json.dumps(TOOLS)  # a string is kept as written
    assert isinstance(conv[1].tools, str) and json.loads(conv[1].tools) == TOOLS
    assert conv[2].tools == conv[3].tools == ""
    assert [m["role"] for m in conv[0].messages] == ["user", "function", "observation", "assistant"]


def test_tools_are_read_only_when_the_column_is_mapped(tmp_path):
    row = {"conversations": [turn("human", "q"), turn("gpt", "a")], "tools": json.dumps(TOOLS)}
    assert load(tmp_path, [row], formatting="sharegpt")[0].tools == ""


def test_alpaca_rows_read_the_tools_column_too(tmp_path):
    row = {"instruction": "Where is order 7?", "output": "It has shipped.", "functions": TOOLS}
    assert json.loads(load(tmp_path, [row], columns={"tools": "functions"})[0].tools) == TOOLS


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("[{not json", "not valid JSON"),
        (json.dumps(TOOLS[0]), "expected a JSON list of function schemas"),
        (json.dumps(["track_order"]), "expected a JSON list of function schemas"),
        (3, "expected a JSON list of function schemas, got int"),
    ],
)
def test_bad_tools_value_is_a_row_error_naming_the_field(tmp_path, value, problem):
    good = {"conversations": [turn("human", "q"), turn("gpt", "a")]}
    rows = [good, {**good, "fns": value}]
    [exc] = row_errors(tmp_path, rows, formatting="sharegpt", columns={"tools": "fns"})
    assert (exc.row, exc.field) == (1, "fns")
    assert problem in str(exc)
    assert '[{"name": ..., "description": ..., "parameters": {...}}, ...]' in str(exc)


@pytest.mark.parametrize("value", [TOOLS[0], ["track_order"], [1, 2]], ids=["object", "names", "numbers"])
def test_tools_given_as_json_values_are_checked_like_tools_given_as_text(tmp_path, value):
    """The same tools are refused as a JSON string (above); as a list or object they pass unchecked and
    crash later, when a chat template describes them (AttributeError in ``tools.describe``)."""
    good = {"conversations": [turn("human", "q"), turn("gpt", "a")]}
    [exc] = row_errors(tmp_path, [{**good, "fns": value}], formatting="sharegpt", columns={"tools": "fns"})
    assert exc.field == "fns"
    assert "expected a JSON list of function schemas" in str(exc)


# ---------------------------------------------------------------------------------------------- preference
def test_alpaca_preference_rows(tmp_path):
    rows = [
        {"instruction": "Refund?", "input": "order 7", "chosen": "Yes, within 30 days.", "rejected": "No."},
        {"q": "unused", "instruction": "Hi", "better": "Hello!", "worse": "What."},
    ]
    conv = load(tmp_path, rows[:1], stage="dpo", ranking=True)
    ex = conv[0]
    assert ex.messages == (
        {"role": "user", "content": "Refund?\norder 7"},
        {"role": "assistant", "content": "Yes, within 30 days."},
    )
    assert ex.rejected == {"role": "assistant", "content": "No."}
    assert ex.kto_tag is None
    remapped = load(tmp_path, rows[1:], stage="rm", ranking=True, columns={"chosen": "better", "rejected": "worse"})
    assert (remapped[0].label, remapped[0].rejected["content"]) == ("Hello!", "What.")


def test_alpaca_preference_rows_need_both_replies(tmp_path):
    rows = [
        {"instruction": "q", "chosen": "good", "rejected": "bad"},
        {"instruction": "q", "chosen": "good"},
        {"instruction": "q", "chosen": "good", "rejected": 3},
        {"instruction": "q", "output": "an sft reply", "rejected": "bad"},
    ]
    errors = row_errors(tmp_path, rows, stage="dpo", ranking=True)
    assert [(e.row, e.field) for e in errors] == [(1, "rejected"), (2, "rejected"), (3, "chosen")]
    assert "missing" in str(errors[0]) and '"columns": {"rejected": "<your column>"}' in str(errors[0])


def test_sharegpt_preference_rows_end_with_a_question(tmp_path):
    row = {
        "conversations": [
            turn("system", "Be kind."),
            turn("human", "Hi"),
            turn("gpt", "Hello"),
            turn("human", "Refund?"),
        ],
        "chosen": turn("gpt", "Yes, within 30 days."),
        "rejected": turn("gpt", "No."),
    }
    ex = load(tmp_path, [row], stage="dpo", formatting="sharegpt", ranking=True)[0]
    assert ex.messages == (
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Refund?"},
        {"role": "assistant", "content": "Yes, within 30 days."},
    )
    assert ex.rejected == {"role": "assistant", "content": "No."}


def test_sharegpt_preference_reply_may_be_a_function_call(tmp_path):
    row = {
        "conversations": [turn("human", "Where is order 7?")],
        "chosen": turn("function_call", '{"name": "track_order"}'),
        "rejected": turn("gpt", "No idea."),
    }
    ex = load(tmp_path, [row], stage="dpo", formatting="sharegpt", ranking=True)[0]
    assert ex.messages[-1] == {"role": "function", "content": '{"name": "track_order"}'}
    assert ex.rejected == {"role": "assistant", "content": "No idea."}


def test_sharegpt_preference_row_errors(tmp_path):
    pair = {"chosen": turn("gpt", "good"), "rejected": turn("gpt", "bad")}
    rows = [
        {"conversations": [turn("human", "q")], **pair},
        {"conversations": [turn("human", "q"), turn("gpt", "a")], **pair},  # even: the reply is in the turns
        {"conversations": [turn("human", "q")], "chosen": "good", "rejected": turn("gpt", "bad")},
        {"conversations": [turn("human", "q")], "chosen": turn("gpt", "good"), "rejected": turn("human", "bad")},
    ]
    errors = row_errors(tmp_path, rows, stage="dpo", formatting="sharegpt", ranking=True)
    assert [(e.row, e.field) for e in errors] == [(1, "conversations"), (2, "chosen"), (3, "rejected")]
    assert "odd number of turns), got 2 turns" in str(errors[0])
    assert "expected one reply message" in str(errors[1])


def test_preference_data_and_stage_must_match(tmp_path):
    pairs = [{"instruction": "q", "chosen": "good", "rejected": "bad"}]
    rows = [{"instruction": "q", "output": "a"}]
    registry = write_dir(tmp_path, {"pairs": (pairs, {"ranking": True}), "rows": (rows, {})})
    for stage in ("sft", "pt", "kto", "ppo"):
        with pytest.raises(DatasetError) as err:
            registry.load("pairs", stage=stage)
        assert not isinstance(err.value, DatasetRowError)  # a dataset problem, not a row problem
        assert "'pairs' is preference data (ranking: true); it trains with stage: dpo or rm" in str(err.value)
    for stage in ("dpo", "rm"):
        with pytest.raises(DatasetError, match="'rows' is not preference data; stage dpo/rm needs chosen"):
            registry.load("rows", stage=stage)


# ---------------------------------------------------------------------------------------------- KTO
def test_kto_rows_carry_their_tag(tmp_path):
    rows = [
        {"instruction": "Refund?", "output": "Yes, within 30 days.", "good": True},
        {"instruction": "Refund?", "output": "No.", "good": False},
    ]
    conv = load(tmp_path, rows, stage="kto", columns={"kto_tag": "good"})
    assert [ex.kto_tag for ex in conv] == [True, False]
    assert conv[1].messages[-1] == {"role": "assistant", "content": "No."}
    assert all(ex.rejected is None for ex in conv)


def test_sharegpt_kto_rows(tmp_path):
    row = {"conversations": [turn("human", "q"), turn("gpt", "a")], "label": False}
    ex = load(tmp_path, [row], stage="kto", formatting="sharegpt", columns={"kto_tag": "label"})[0]
    assert ex.kto_tag is False and ex.label == "a"


def test_kto_tag_is_read_only_for_kto(tmp_path):
    rows = [{"instruction": "q", "output": "a", "good": "not a bool"}]
    assert load(tmp_path, rows, columns={"kto_tag": "good"})[0].kto_tag is None


@pytest.mark.parametrize("value", ["true", 1, None])
def test_kto_tag_that_is_not_a_bool_is_a_row_error(tmp_path, value):
    rows = [{"instruction": "q", "output": "a", "good": True}, {"instruction": "q", "output": "a", "good": value}]
    [exc] = row_errors(tmp_path, rows, stage="kto", columns={"kto_tag": "good"})
    assert (exc.row, exc.field) == (1, "good")
    assert f"expected true or false, got {str(value)!r}" in str(exc)
    assert "JSON boolean" in str(exc)


def test_kto_without_a_kto_tag_column_is_one_dataset_error(tmp_path):
    rows = [{"instruction": "q", "output": "a", "kto_tag": True}] * 3
    with pytest.raises(DatasetError) as err:
        row_errors(tmp_path, rows, stage="kto")
    assert not isinstance(err.value, DatasetRowError)  # one error for the entry, not one per row
    assert "dataset 'd'" in str(err.value) and "maps no kto_tag column" in str(err.value)
    assert '"columns": {"kto_tag": "<your bool column>"}' in str(err.value)


def test_kto_row_still_needs_a_reply(tmp_path):
    rows = [{"instruction": "q", "good": True}]
    [exc] = row_errors(tmp_path, rows, stage="kto", columns={"kto_tag": "good"})
    assert exc.field == "output"


# ---------------------------------------------------------------------------------------------- pre-training text
def test_pt_text_rows_need_no_output(tmp_path):
    rows = [{"text": "Orders ship within two days."}, {"text": "Refunds take a week.", "output": "ignored"}]
    conv = load(tmp_path, rows, stage="pt", columns={"prompt": "text"})
    assert [ex.text for ex in conv] == ["Orders ship within two days.", "Refunds take a week."]
    assert conv[0].messages == ({"role": "user", "content": "Orders ship within two days."},)


def test_pt_text_skips_the_system_message(tmp_path):
    rows = [{"text": "Body.", "sys": "A system prompt."}]
    ex = load(tmp_path, rows, stage="pt", columns={"prompt": "text", "system": "sys"})[0]
    assert ex.messages[0]["role"] == "system"
    assert ex.text == "Body."


def test_pt_text_rows_still_need_text(tmp_path):
    rows = [{"text": "ok"}, {"text": ""}, {"text": 5}, {"other": "x"}]
    errors = row_errors(tmp_path, rows, stage="pt", columns={"prompt": "text"})
    assert [(e.row, e.field) for e in errors] == [(1, "text"), (2, "text"), (3, "text")]


def test_sharegpt_pt_row_with_no_text_is_a_row_error(tmp_path):
    """A system message alone holds no pre-training text; it must not become an empty example."""
    rows = [{"conversations": [turn("human", "Some text.")]}, {"conversations": [turn("system", "s")]}]
    [exc] = row_errors(tmp_path, rows, stage="pt", formatting="sharegpt")
    assert (exc.row, exc.field) == (1, "conversations")


def test_sharegpt_pt_rows_take_the_first_message(tmp_path):
    rows = [{"conversations": [turn("system", "s"), turn("human", "Some text.")]}]
    assert load(tmp_path, rows, stage="pt", formatting="sharegpt")[0].text == "Some text."


# ---------------------------------------------------------------------------------------------- every bad row
@pytest.fixture()
def two_bad_datasets(tmp_path: Path) -> DatasetRegistry:
    alpaca = [
        {"instruction": "q0", "output": "a0"},
        {"instruction": "q1"},
        {"instruction": "q2", "output": "a2"},
        {"instruction": "q3", "output": 3},
    ]
    sharegpt = [
        {"conversations": [turn("human", "a"), turn("human", "b")]},
        {"conversations": [turn("human", "q"), turn("gpt", "a")]},
        {"conversations": [turn("human", "q"), turn("bot", "a")]},
    ]
    return write_dir(tmp_path, {"alpaca": (alpaca, {}), "chat": (sharegpt, {"formatting": "sharegpt"})})


def test_every_bad_row_of_every_dataset_is_reported_in_one_error(two_bad_datasets, tmp_path):
    with pytest.raises(DatasetRowsError) as err:
        two_bad_datasets.load("alpaca,chat")
    exc = err.value
    a, c = str(tmp_path / "alpaca.json"), str(tmp_path / "chat.json")
    assert [(e.file, e.row, e.field) for e in exc.rows] == [
        (a, 1, "output"),
        (a, 3, "output"),
        (c, 0, "conversations"),
        (c, 2, "conversations[1].from"),
    ]
    assert isinstance(exc, DatasetRowError) and isinstance(exc, ValueError)  # old handlers still catch it
    assert (exc.file, exc.row, exc.field) == (a, 1, "output")
    text = str(exc)
    assert text.startswith(f"4 bad rows in {a}, {c}:\n")
    assert all(f"  - {e}" in text for e in exc.rows)
    assert "set skip_invalid: true" in text


def test_one_error_shows_the_first_20_rows_and_counts_the_rest(tmp_path):
    rows = [{"instruction": f"q{i}"} for i in range(25)]
    with pytest.raises(DatasetRowsError) as err:
        load(tmp_path, rows)
    assert [e.row for e in err.value.rows] == list(range(25))
    text = str(err.value)
    assert text.startswith(f"25 bad rows in {tmp_path / 'd.json'}:\n")
    assert text.count("\n  - ") == 20
    assert f"{tmp_path / 'd.json'}, row 19, field" in text and f"{tmp_path / 'd.json'}, row 20, field" not in text
    assert "  ... and 5 more" in text


def test_max_samples_limits_the_rows_checked(two_bad_datasets):
    conv = two_bad_datasets.load("alpaca", max_samples=1)
    assert len(conv) == 1 and conv.skipped == 0


# ---------------------------------------------------------------------------------------------- skip_invalid
def test_skip_invalid_drops_bad_rows_and_logs_them(two_bad_datasets, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="finetune_kit.data"):
        conv = two_bad_datasets.load("alpaca,chat", skip_invalid=True)
    assert conv.skipped == 4
    assert [ex.label for ex in conv] == ["a0", "a2", "a"]
    assert conv.names == ("alpaca", "chat")
    [record] = [r for r in caplog.records if r.name == "finetune_kit.data"]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "dropped 4 bad row(s) of 7" in message
    a, c = tmp_path / "alpaca.json", tmp_path / "chat.json"
    for place in (f"{a}, row 1", f"{a}, row 3", f"{c}, row 0", f"{c}, row 2"):
        assert place in message


def test_skip_invalid_with_clean_data_logs_nothing(two_bad_datasets, caplog):
    with caplog.at_level(logging.WARNING, logger="finetune_kit.data"):
        conv = two_bad_datasets.load("alpaca", max_samples=1, skip_invalid=True)
    assert conv.skipped == 0 and len(conv) == 1
    assert [r for r in caplog.records if r.name == "finetune_kit.data"] == []


def test_skipped_count_survives_head_and_split(two_bad_datasets):
    conv = two_bad_datasets.load("alpaca,chat", skip_invalid=True)
    train, val = conv.split(1)
    assert conv.head(2).skipped == train.skipped == val.skipped == 4


def test_skip_invalid_with_no_good_row_left_is_an_error(tmp_path):
    registry = write_dir(tmp_path, {"d": ([{"instruction": "q"}, {"instruction": "r"}], {})})
    with pytest.raises(DatasetError, match="no usable rows in d"):
        registry.load("d", skip_invalid=True)
