"""sharegpt rows: a list of {from, value} messages (names configurable through ``tags``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from finetune_kit.data.formats.common import ensure_row_object, text_field
from finetune_kit.data.messages import Message, check_turns
from finetune_kit.errors import DatasetRowError

if TYPE_CHECKING:  # for annotations only: spec.py imports the format registry (see formats/__init__.py)
    from finetune_kit.data.spec import DatasetSpec


def to_messages(row: Any, spec: DatasetSpec, where: tuple[str, int]) -> list[Message]:
    """Turn one sharegpt row into chat messages, checking that roles alternate.

    After an optional leading system message, turns must go user, assistant, user, ... and end
    with an assistant reply. LLaMA-Factory skips rows that break this; we raise instead.
    """
    row = ensure_row_object(row, where)
    file, index = where
    col = spec.column("messages")
    tags = spec.tag
    if col not in row:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise DatasetRowError(
            file=file,
            row=index,
            field=col,
            problem=f"the column is missing (columns present: {present})",
            fix='add it, or map your column in dataset_info.json: "columns": {"messages": "<col>"}',
        )
    turns = row[col]
    if not isinstance(turns, list) or not turns:
        raise DatasetRowError(
            file=file,
            row=index,
            field=col,
            problem=f"expected a non-empty list of messages, got {str(turns)[:60]!r}",
            fix="write the conversation as a list of messages",
        )
    roles = {tags("user_tag"): "user", tags("assistant_tag"): "assistant", tags("system_tag"): "system"}
    unsupported = {tags("observation_tag"), tags("function_tag")}
    messages: list[Message] = []
    system_col = spec.columns.get("system")
    if system_col and row.get(system_col):
        messages.append({"role": "system", "content": text_field(row, system_col, where, required=True, key="system")})
    for i, turn in enumerate(turns):
        field = f"{col}[{i}]"
        if not isinstance(turn, dict):
            raise DatasetRowError(
                file=file,
                row=index,
                field=field,
                problem=f"expected an object, got {str(turn)[:60]!r}",
                fix=f'write each message as {{"{tags("role_tag")}": ..., "{tags("content_tag")}": ...}}',
            )
        tag = turn.get(tags("role_tag"))
        if tag in unsupported:
            raise DatasetRowError(
                file=file,
                row=index,
                field=f"{field}.{tags('role_tag')}",
                problem=f"tool messages ({tag!r}) are not supported yet",
                fix="remove tool-calling rows from this dataset for now",
            )
        if tag not in roles:
            raise DatasetRowError(
                file=file,
                row=index,
                field=f"{field}.{tags('role_tag')}",
                problem=f"unknown role tag {tag!r}; this dataset's tags are {sorted(roles)}",
                fix='set "tags" in dataset_info.json to match your data (role_tag, user_tag, ...)',
            )
        content = turn.get(tags("content_tag"))
        if not isinstance(content, str):
            raise DatasetRowError(
                file=file,
                row=index,
                field=f"{field}.{tags('content_tag')}",
                problem=f"expected a string, got {str(content)[:60]!r}",
                fix=f"give every message a text '{tags('content_tag')}'",
            )
        role = roles[tag]
        if role == "system":
            if i != 0:
                raise DatasetRowError(
                    file=file,
                    row=index,
                    field=field,
                    problem="a system message may only come first",
                    fix="move it to the start of the conversation",
                )
            messages = [{"role": "system", "content": content}]
            continue
        messages.append({"role": role, "content": content})
    problem = check_turns([m["role"] for m in messages])
    if problem is not None:
        raise DatasetRowError(
            file=file,
            row=index,
            field=col,
            problem=f"turn {problem.turn} is from the {problem.role} but the {problem.expected} was "
            "expected (turns must alternate user, assistant, ...)",
            fix="fix the order of the messages or remove the row",
        )
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body or body[-1]["role"] != "assistant":
        raise DatasetRowError(
            file=file,
            row=index,
            field=col,
            problem="the conversation does not end with an assistant reply, so there is nothing to train",
            fix="end it with a reply from the assistant tag, or drop the last user turn",
        )
    return messages
