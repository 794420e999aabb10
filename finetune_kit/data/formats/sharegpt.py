"""sharegpt and openai rows: a list of messages whose role and content keys are set by ``tags``.

``sharegpt`` rows use ``from``/``value`` by default; ``openai`` rows (``formatting: openai``)
use the same tags, plus OpenAI's own tool fields: an assistant message's ``tool_calls`` becomes
a function turn, and consecutive tool results become one observation turn.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from finetune_kit.data.conversations import Example
from finetune_kit.data.formats.common import ensure_row_object, kto_field, text_field, tools_field
from finetune_kit.data.messages import ANSWERING, Message, check_turns
from finetune_kit.errors import DatasetRowError

if TYPE_CHECKING:  # for annotations only: spec.py imports the format registry (see formats/__init__.py)
    from finetune_kit.data.spec import DatasetSpec

_RESULTS_JOIN = "\n</tool_response>\n<tool_response>\n"


def to_example(row: Any, spec: DatasetSpec, where: tuple[str, int], kind: str = "sft") -> Example:
    """Turn one sharegpt row into an :class:`Example` for ``kind``, checking the turn order.

    After an optional leading system message, turns go user (or observation), assistant (or
    function call), ... Supervised and KTO rows end with a reply; preference rows end with a
    question and take the replies from the ``chosen``/``rejected`` columns. LLaMA-Factory skips
    rows that break this, with a log line; we raise a row error instead.
    """
    return _example(row, spec, where, kind, openai=False)


def to_example_openai(row: Any, spec: DatasetSpec, where: tuple[str, int], kind: str = "sft") -> Example:
    """Like :func:`to_example`, reading OpenAI ``tool_calls`` and tool-result messages."""
    return _example(row, spec, where, kind, openai=True)


class _Row:
    """Error helper bound to one row."""

    def __init__(self, where: tuple[str, int]) -> None:
        self.file, self.index = where

    def error(self, field: str, problem: str, fix: str) -> DatasetRowError:
        return DatasetRowError(file=self.file, row=self.index, field=field, problem=problem, fix=fix)


def _example(row: Any, spec: DatasetSpec, where: tuple[str, int], kind: str, *, openai: bool) -> Example:
    row = ensure_row_object(row, where)
    at = _Row(where)
    col = spec.column("messages")
    if col not in row:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise at.error(
            col,
            f"the column is missing (columns present: {present})",
            'add it, or map your column in dataset_info.json: "columns": {"messages": "<col>"}',
        )
    turns = row[col]
    if not isinstance(turns, list) or not turns:
        raise at.error(
            col, f"expected a non-empty list of messages, got {str(turns)[:60]!r}", "write the conversation as a list"
        )
    system, messages = _read_messages(turns, spec, at, col, openai)
    if system is None and spec.columns.get("system"):
        system = text_field(row, spec.columns["system"], where, required=False, key="system") or None
    head: list[Message] = [{"role": "system", "content": system}] if system else []
    if not messages:
        raise at.error(
            col, "the conversation has no turns besides the system message", "add the turns, or remove the row"
        )
    problem = check_turns([m["role"] for m in messages])
    if problem is not None:
        raise at.error(
            col,
            f"turn {problem.turn} is {_a(problem.role)} message but {_a(problem.expected)} one was expected "
            "(turns alternate user or observation, then assistant or function call)",
            "fix the order of the messages or remove the row",
        )
    source, tools = f"{where[0]}, row {where[1]}", tools_field(row, spec, where)
    if kind == "text":
        if not messages[0]["content"].strip():
            raise at.error(f"{col}[0]", "the text is empty", "fill it in or remove the row")
        return Example(tuple(head + messages), source, tools)
    if kind == "pairwise":
        if len(messages) % 2 == 0:
            raise at.error(
                col,
                f"a preference row must end with a question (an odd number of turns), got {len(messages)} turns",
                "drop the last reply: the replies come from the chosen and rejected columns",
            )
        chosen = _reply(row, spec, at, "chosen", openai)
        rejected = _reply(row, spec, at, "rejected", openai)
        return Example(tuple(head + messages + [chosen]), source, tools, rejected=rejected)
    if messages[-1]["role"] not in ANSWERING:
        raise at.error(
            col,
            "the conversation does not end with an assistant reply, so there is nothing to train",
            "end it with a reply from the assistant tag, or drop the last user turn",
        )
    tag = kto_field(row, spec, where) if kind == "kto" else None
    return Example(tuple(head + messages), source, tools, kto_tag=tag)


def _a(word: str | None) -> str:
    return f"{'an' if str(word)[:1] in 'aeio' else 'a'} {word}"


def _read_messages(
    turns: list[Any], spec: DatasetSpec, at: _Row, col: str, openai: bool
) -> tuple[str | None, list[Message]]:
    tags = spec.tag
    role_key, content_key = tags("role_tag"), tags("content_tag")
    roles = {
        tags("user_tag"): "user",
        tags("assistant_tag"): "assistant",
        tags("observation_tag"): "observation",
        tags("function_tag"): "function",
        tags("system_tag"): "system",
    }
    system: str | None = None
    messages: list[Message] = []
    results: list[str] = []
    for i, turn in enumerate(turns):
        field = f"{col}[{i}]"
        if not isinstance(turn, dict):
            raise at.error(
                field,
                f"expected an object, got {str(turn)[:60]!r}",
                f'write each message as {{"{role_key}": ..., "{content_key}": ...}}',
            )
        tag = turn.get(role_key)
        if tag not in roles:
            raise at.error(
                f"{field}.{role_key}",
                f"unknown role tag {tag!r}; this dataset's tags are {sorted(map(str, roles))}",
                'set "tags" in dataset_info.json to match your data (role_tag, user_tag, ...)',
            )
        role = roles[tag]
        content = turn.get(content_key)
        if openai and role in ANSWERING and turn.get("tool_calls"):
            content, role = _calls(turn["tool_calls"], at, f"{field}.tool_calls"), "function"
        if not isinstance(content, str):
            raise at.error(
                f"{field}.{content_key}",
                f"expected a string, got {str(content)[:60]!r}",
                f"give every message a text '{content_key}'",
            )
        if role == "system":
            if i != 0:
                raise at.error(field, "a system message may only come first", "move it to the start")
            system = content
            continue
        if openai and role == "observation":
            results.append(content)
            continue
        if results:
            messages.append({"role": "observation", "content": _RESULTS_JOIN.join(results)})
            results = []
        messages.append({"role": role, "content": content})
    if results:
        messages.append({"role": "observation", "content": _RESULTS_JOIN.join(results)})
    return system, messages


def _calls(tool_calls: Any, at: _Row, field: str) -> str:
    """OpenAI ``tool_calls`` as the JSON list of ``{"name", "arguments"}`` a function turn holds."""
    if not isinstance(tool_calls, list) or not all(isinstance(c, dict) and "function" in c for c in tool_calls):
        raise at.error(
            field,
            f"expected a list of {{'type': 'function', 'function': {{...}}}} objects, got {str(tool_calls)[:60]!r}",
            "write tool calls as OpenAI does",
        )
    return json.dumps([c["function"] for c in tool_calls], ensure_ascii=False)


def _reply(row: dict[str, Any], spec: DatasetSpec, at: _Row, key: str, openai: bool) -> Message:
    col = spec.column(key)
    value = row.get(col)
    tags = spec.tag
    role_key, content_key = tags("role_tag"), tags("content_tag")
    replies = {tags("assistant_tag"): "assistant", tags("function_tag"): "function"}
    if not isinstance(value, dict) or value.get(role_key) not in replies or not isinstance(value.get(content_key), str):
        raise at.error(
            col,
            f"expected one reply message such as {{'{role_key}': '{tags('assistant_tag')}', '{content_key}': '...'}}, "
            f"got {str(value)[:60]!r}",
            f'write the {key} reply as one message object from the assistant (or map "columns": {{"{key}": ...}})',
        )
    content = value[content_key]
    if openai and value.get("tool_calls"):
        return {"role": "function", "content": _calls(value["tool_calls"], at, f"{col}.tool_calls")}
    return {"role": replies[value[role_key]], "content": content}
