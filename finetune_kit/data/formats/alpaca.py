"""alpaca rows: instruction / input / output, optional system and history."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from finetune_kit.data.conversations import Example
from finetune_kit.data.formats.common import ensure_row_object, kto_field, text_field, tools_field
from finetune_kit.data.messages import Message
from finetune_kit.errors import DatasetRowError

if TYPE_CHECKING:  # for annotations only: spec.py imports the format registry (see formats/__init__.py)
    from finetune_kit.data.spec import DatasetSpec


def to_example(row: Any, spec: DatasetSpec, where: tuple[str, int], kind: str = "sft") -> Example:
    """Turn one alpaca row into an :class:`Example` for ``kind`` (see ``formats.common.KINDS``).

    The user turn is ``instruction`` and ``input`` joined by a newline (LLaMA-Factory's rule);
    ``history`` pairs come first and their replies are trained too. Pre-training text needs no
    reply; preference rows take their replies from the ``chosen``/``rejected`` columns.
    """
    row = ensure_row_object(row, where)
    cols = spec.column
    instruction = text_field(row, cols("prompt"), where, required=False, key="prompt")
    query = text_field(row, cols("query"), where, required=False, key="query")
    prompt = "\n".join(part for part in (instruction, query) if part)
    if not prompt.strip():
        raise DatasetRowError(
            file=where[0],
            row=where[1],
            field=cols("prompt"),
            problem=f"both '{cols('prompt')}' and '{cols('query')}' are empty",
            fix="give the row an instruction, or remove it",
        )
    messages: list[Message] = []
    system_col = spec.columns.get("system")
    if system_col:
        system = text_field(row, system_col, where, required=False, key="system")
        if system:
            messages.append({"role": "system", "content": system})
    history_col = spec.columns.get("history")
    if history_col and row.get(history_col):
        history = row[history_col]
        if not isinstance(history, list):
            raise DatasetRowError(
                file=where[0],
                row=where[1],
                field=history_col,
                problem=f"expected a list of [prompt, response] pairs, got {type(history).__name__}",
                fix='write it as [["question", "answer"], ...]',
            )
        for turn, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise DatasetRowError(
                    file=where[0],
                    row=where[1],
                    field=f"{history_col}[{turn}]",
                    problem=f"expected a [prompt, response] pair of strings, got {str(pair)[:60]!r}",
                    fix='write each history item as ["question", "answer"]',
                )
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages.append({"role": "user", "content": prompt})
    source, tools = f"{where[0]}, row {where[1]}", tools_field(row, spec, where)
    if kind == "text":
        return Example(tuple(messages), source, tools)
    if kind == "pairwise":
        chosen = text_field(row, cols("chosen"), where, required=True, key="chosen")
        rejected = text_field(row, cols("rejected"), where, required=True, key="rejected")
        messages.append({"role": "assistant", "content": chosen})
        return Example(tuple(messages), source, tools, rejected={"role": "assistant", "content": rejected})
    response = text_field(row, cols("response"), where, required=True, key="response")
    messages.append({"role": "assistant", "content": response})
    tag = kto_field(row, spec, where) if kind == "kto" else None
    return Example(tuple(messages), source, tools, kto_tag=tag)
