"""alpaca and sharegpt rows become chat messages; malformed rows fail loudly, naming file, row, field and fix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from finetune_kit.data.registry import DatasetRegistry
from finetune_kit.errors import DatasetError, DatasetRowError, DatasetRowsError

GOOD = {"instruction": "Say hi", "input": "", "output": "hi"}


def load(tmp_path: Path, rows: list | str, *, formatting: str = "alpaca", suffix: str = ".json", **entry):
    """Write ``rows`` to a file, register it, and load it."""
    path = tmp_path / f"data{suffix}"
    if isinstance(rows, str):
        text = rows
    elif suffix == ".jsonl":
        text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    else:
        text = json.dumps(rows, ensure_ascii=False, indent=1)
    path.write_text(text, encoding="utf-8")
    info = {"d": {"file_name": path.name, "formatting": formatting, **entry}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    return DatasetRegistry.from_dir(tmp_path).load("d")


def row_error(tmp_path: Path, rows, **kwargs) -> DatasetRowError:
    """Load ``rows`` that hold exactly one bad row; return that row's error."""
    with pytest.raises(DatasetRowsError) as err:
        load(tmp_path, rows, **kwargs)
    assert len(err.value.rows) == 1, str(err.value)
    exc = err.value.rows[0]
    suffix = kwargs.get("suffix", ".json")
    assert exc.file == str(tmp_path / f"data{suffix}")
    assert str(exc).startswith(f"{exc.file}, row {exc.row}, field '{exc.field}': ")
    assert "Fix: " in str(exc)
    assert (err.value.file, err.value.row, err.value.field) == (exc.file, exc.row, exc.field)
    assert f"  - {exc}\n" in str(err.value)  # the load error shows the row's own message
    return exc


# ---------------------------------------------------------------------------------------------- alpaca
def test_alpaca_instruction_and_input_are_joined_by_a_newline(tmp_path):
    conv = load(
        tmp_path,
        [
            {"instruction": "Translate to English", "input": "bonjour", "output": "hello"},
            {"instruction": "Say hi", "input": "", "output": "hi"},
            {"instruction": "", "input": "only input", "output": "ok"},
        ],
    )
    assert [ex.messages for ex in conv.examples] == [
        ({"role": "user", "content": "Translate to English\nbonjour"}, {"role": "assistant", "content": "hello"}),
        ({"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}),
        ({"role": "user", "content": "only input"}, {"role": "assistant", "content": "ok"}),
    ]
    assert conv[0].prompt_messages == [{"role": "user", "content": "Translate to English\nbonjour"}]
    assert conv[0].label == "hello"


def test_alpaca_system_column(tmp_path):
    conv = load(tmp_path, [{**GOOD, "system": "You are terse."}, {**GOOD, "system": ""}], columns={"system": "system"})
    assert conv[0].messages[0] == {"role": "system", "content": "You are terse."}
    assert [m["role"] for m in conv[1].messages] == ["user", "assistant"]  # empty system: none


def test_alpaca_system_is_ignored_unless_mapped(tmp_path):
    conv = load(tmp_path, [{**GOOD, "system": "You are terse."}])
    assert [m["role"] for m in conv[0].messages] == ["user", "assistant"]


def test_alpaca_history_pairs_become_earlier_turns(tmp_path):
    row = {"instruction": "And 3+3?", "input": "", "output": "6", "history": [["1+1?", "2"], ["2+2?", "4"]]}
    conv = load(tmp_path, [row], columns={"history": "history"})
    assert conv[0].messages == (
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    )


def test_missing_output(tmp_path):
    exc = row_error(tmp_path, [GOOD, GOOD, {"instruction": "q", "input": ""}])
    assert (exc.row, exc.field) == (2, "output")
    assert "missing" in str(exc) and "columns present: input, instruction" in str(exc)
    assert '"columns": {"response": "<your column>"}' in str(exc)


def test_output_is_a_number(tmp_path):
    exc = row_error(tmp_path, [GOOD, {"instruction": "6*7?", "output": 42}])
    assert (exc.row, exc.field) == (1, "output")
    assert "expected a string, got int '42'" in str(exc)


def test_remapped_column_is_named_in_the_error(tmp_path):
    exc = row_error(tmp_path, [{"q": "hi"}], columns={"prompt": "q", "response": "a"})
    assert exc.field == "a"


def test_empty_instruction_and_input(tmp_path):
    exc = row_error(tmp_path, [GOOD, {"instruction": "", "input": "  ", "output": "x"}])
    assert (exc.row, exc.field) == (1, "instruction")
    assert "both 'instruction' and 'input' are empty" in str(exc)


def test_empty_output(tmp_path):
    exc = row_error(tmp_path, [{"instruction": "q", "output": "   "}])
    assert (exc.row, exc.field) == (0, "output")
    assert "empty" in str(exc)


def test_history_not_a_list(tmp_path):
    exc = row_error(tmp_path, [{**GOOD, "history": "1+1? 2"}], columns={"history": "history"})
    assert (exc.row, exc.field) == (0, "history")
    assert "got str" in str(exc)


def test_history_item_not_a_pair(tmp_path):
    exc = row_error(tmp_path, [{**GOOD, "history": [["a", "b"], ["only one"]]}], columns={"history": "history"})
    assert exc.field == "history[1]"


def test_row_not_an_object(tmp_path):
    exc = row_error(tmp_path, [GOOD, ["instruction", "output"]])
    assert (exc.row, exc.field) == (1, "<row>")
    assert "expected an object, got list" in str(exc)


def test_invalid_json_names_the_line(tmp_path):
    text = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": d}\n]\n'
    with pytest.raises(DatasetError) as err:
        load(tmp_path, text)
    assert str(err.value).startswith(f"{tmp_path / 'data.json'}: not valid JSON at line 3,")


def test_top_level_object_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="top level is an object"):
        load(tmp_path, json.dumps({"data": [GOOD]}, indent=2))  # one line would be read as one JSON Lines row


def test_jsonl_bad_line_names_the_line_and_row(tmp_path):
    text = json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n{broken\n"
    with pytest.raises(DatasetError) as err:
        load(tmp_path, text, suffix=".jsonl")
    assert f"{tmp_path / 'data.jsonl'}, line 4 (row 2): not valid JSON" in str(err.value)


def test_jsonl_row_errors_use_row_indexes(tmp_path):
    exc = row_error(tmp_path, [GOOD, GOOD, GOOD, {"instruction": "q"}], suffix=".jsonl")
    assert exc.row == 3


def test_json_lines_saved_as_json_are_accepted(tmp_path):
    text = json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "output": "hey"}) + "\n"
    conv = load(tmp_path, text)
    assert [ex.label for ex in conv.examples] == ["hi", "hey"]


def test_one_row_json_lines_saved_as_json_is_accepted(tmp_path):
    conv = load(tmp_path, json.dumps(GOOD) + "\n")
    assert [ex.label for ex in conv.examples] == ["hi"]


# ---------------------------------------------------------------------------------------------- sharegpt
def turn(role: str, text: str) -> dict[str, str]:
    return {"from": role, "value": text}


def test_sharegpt_multi_turn_with_system(tmp_path):
    row = {
        "conversations": [
            turn("system", "Be brief."),
            turn("human", "Hi"),
            turn("gpt", "Hello"),
            turn("human", "Bye"),
            turn("gpt", "Goodbye"),
        ]
    }
    conv = load(tmp_path, [row], formatting="sharegpt")
    assert conv[0].messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    )
    assert conv[0].label == "Goodbye"
    assert conv[0].prompt_messages[-1] == {"role": "user", "content": "Bye"}


def test_sharegpt_system_message_overrides_the_system_column(tmp_path):
    rows = [
        {
            "system": "column system",
            "conversations": [turn("system", "message system"), turn("human", "a"), turn("gpt", "b")],
        },
        {"system": "column system", "conversations": [turn("human", "a"), turn("gpt", "b")]},
    ]
    conv = load(tmp_path, rows, formatting="sharegpt", columns={"system": "system"})
    assert conv[0].messages[0] == {"role": "system", "content": "message system"}
    assert conv[1].messages[0] == {"role": "system", "content": "column system"}
    assert len(conv[0].messages) == len(conv[1].messages) == 3


def test_sharegpt_bad_alternation(tmp_path):
    good = {"conversations": [turn("human", "a"), turn("gpt", "b")]}
    bad = {"conversations": [turn("human", "a"), turn("human", "again"), turn("gpt", "b")]}
    exc = row_error(tmp_path, [good, bad], formatting="sharegpt")
    assert (exc.row, exc.field) == (1, "conversations")
    assert "alternate" in str(exc)


def test_sharegpt_bad_alternation_counts_turns_after_the_system(tmp_path):
    bad = {"conversations": [turn("system", "s"), turn("human", "a"), turn("gpt", "b"), turn("gpt", "c")]}
    exc = row_error(tmp_path, [bad], formatting="sharegpt")
    # the article ("a"/"an") is left to test_sharegpt_turn_order_message_uses_the_right_article
    message = re.sub(r"\bis an? ", "is a(n) ", str(exc))
    assert message == (
        f"{exc.file}, row 0, field 'conversations': turn 2 is a(n) assistant message but a user one was "
        "expected (turns alternate user or observation, then assistant or function call). Fix: fix the "
        "order of the messages or remove the row"
    )


@pytest.mark.parametrize(
    ("turns", "wanted"),
    [
        ([turn("human", "a"), turn("gpt", "b"), turn("gpt", "c")], "turn 2 is an assistant message"),
        ([turn("observation", "r"), turn("observation", "r")], "turn 1 is an observation message"),
        ([turn("human", "a"), turn("human", "b"), turn("gpt", "c")], "turn 1 is a user message"),
    ],
)
def test_sharegpt_turn_order_message_uses_the_right_article(tmp_path, turns, wanted):
    exc = row_error(tmp_path, [{"conversations": turns}], formatting="sharegpt")
    assert wanted in str(exc)


def test_sharegpt_ending_with_the_human(tmp_path):
    bad = {"conversations": [turn("human", "a"), turn("gpt", "b"), turn("human", "c")]}
    exc = row_error(tmp_path, [bad], formatting="sharegpt")
    assert exc.field == "conversations"
    assert "does not end with an assistant reply" in str(exc)


def test_sharegpt_unknown_role_tag(tmp_path):
    bad = {"conversations": [turn("human", "a"), turn("bot", "b")]}
    exc = row_error(tmp_path, [bad], formatting="sharegpt")
    assert exc.field == "conversations[1].from"
    assert "unknown role tag 'bot'" in str(exc)
    assert "['function_call', 'gpt', 'human', 'observation', 'system']" in str(exc)


def test_sharegpt_tool_messages_take_the_user_and_assistant_places(tmp_path):
    call = json.dumps({"name": "lookup", "arguments": {"order": 7}})
    row = {
        "conversations": [
            turn("human", "Where is order 7?"),
            turn("function_call", call),
            turn("observation", '{"status": "shipped"}'),
            turn("gpt", "It has shipped."),
        ]
    }
    conv = load(tmp_path, [row], formatting="sharegpt")
    assert conv[0].messages == (
        {"role": "user", "content": "Where is order 7?"},
        {"role": "function", "content": call},
        {"role": "observation", "content": '{"status": "shipped"}'},
        {"role": "assistant", "content": "It has shipped."},
    )
    assert conv[0].label == "It has shipped."


def test_sharegpt_function_call_may_be_the_reply_trained_on(tmp_path):
    row = {"conversations": [turn("human", "Where is order 7?"), turn("function_call", '{"name": "lookup"}')]}
    conv = load(tmp_path, [row], formatting="sharegpt")
    assert conv[0].messages[-1] == {"role": "function", "content": '{"name": "lookup"}'}


@pytest.mark.parametrize(
    ("turns", "problem"),
    [
        ([turn("function_call", "{}"), turn("gpt", "b")], "turn 0 is a"),  # a call where a question goes
        ([turn("human", "a"), turn("observation", "x")], "turn 1 is a"),  # a result where a reply goes
    ],
)
def test_sharegpt_tool_messages_out_of_place(tmp_path, turns, problem):
    exc = row_error(tmp_path, [{"conversations": turns}], formatting="sharegpt")
    assert exc.field == "conversations"
    assert problem in str(exc) and "alternate" in str(exc)


def test_sharegpt_tool_tags_follow_the_tags_mapping(tmp_path):
    row = {"conversations": [turn("human", "a"), turn("call", "{}"), turn("result", "x"), turn("gpt", "b")]}
    conv = load(tmp_path, [row], formatting="sharegpt", tags={"function_tag": "call", "observation_tag": "result"})
    assert [m["role"] for m in conv[0].messages] == ["user", "function", "observation", "assistant"]


def test_sharegpt_missing_column_and_bad_content(tmp_path):
    exc = row_error(tmp_path, [{"messages": []}], formatting="sharegpt")
    assert exc.field == "conversations"
    exc = row_error(
        tmp_path, [{"conversations": [turn("human", "a"), {"from": "gpt", "value": 3}]}], formatting="sharegpt"
    )
    assert exc.field == "conversations[1].value"


def test_sharegpt_late_system_message(tmp_path):
    bad = {"conversations": [turn("human", "a"), turn("system", "late"), turn("gpt", "b")]}
    exc = row_error(tmp_path, [bad], formatting="sharegpt")
    assert exc.field == "conversations[1]"
    assert "only come first" in str(exc)


def test_sharegpt_system_message_alone_is_a_row_error(tmp_path):
    """Nothing to train on; it must be a row error (file, row, fix), not a crash."""
    exc = row_error(tmp_path, [{"conversations": [turn("system", "Be brief.")]}], formatting="sharegpt")
    assert exc.field == "conversations"
    assert "no turns besides the system message" in str(exc)


def test_every_bad_row_of_the_file_is_reported_at_once(tmp_path):
    rows = [GOOD, {"instruction": "q"}, GOOD, {"instruction": "q", "output": 1}, "not a row"]
    with pytest.raises(DatasetRowsError) as err:
        load(tmp_path, rows)
    assert [(e.row, e.field) for e in err.value.rows] == [(1, "output"), (3, "output"), (4, "<row>")]
    assert str(err.value).startswith(f"3 bad rows in {tmp_path / 'data.json'}:\n")
