"""Row checks shared by the dataset formats."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from finetune_kit.errors import DatasetError, DatasetRowError

if TYPE_CHECKING:
    from finetune_kit.data.spec import DatasetSpec


def text_field(row: dict[str, Any], column: str, where: tuple[str, int], *, required: bool, key: str) -> str:
    """Return ``row[column]`` as a string, raising a row error that names the fix otherwise.

    ``key`` is the dataset_info.json ``columns`` key that maps to ``column``.
    """
    file, index = where
    if column not in row or row[column] is None:
        if not required:
            return ""
        present = ", ".join(sorted(map(str, row))) or "none"
        raise DatasetRowError(
            file=file,
            row=index,
            field=column,
            problem=f"the column is missing (columns present: {present})",
            fix=f"add '{column}' to every row, or map your column in dataset_info.json: "
            f'"columns": {{"{key}": "<your column>"}}',
        )
    value = row[column]
    if not isinstance(value, str):
        raise DatasetRowError(
            file=file,
            row=index,
            field=column,
            problem=f"expected a string, got {type(value).__name__} {str(value)[:60]!r}",
            fix="write this field as text (a quoted JSON string; in CSV or parquet, a string column)",
        )
    if required and not value.strip():
        raise DatasetRowError(
            file=file, row=index, field=column, problem="the text is empty", fix="fill it in or remove the row"
        )
    return value


def ensure_row_object(row: Any, where: tuple[str, int]) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DatasetRowError(
            file=where[0],
            row=where[1],
            field="<row>",
            problem=f"expected an object, got {type(row).__name__} {str(row)[:60]!r}",
            fix='each row must be a JSON object such as {"instruction": ..., "output": ...}',
        )
    return row


KINDS = {"pt": "text", "sft": "sft", "ppo": "sft", "rm": "pairwise", "dpo": "pairwise", "kto": "kto"}
"""What each LLaMA-Factory ``stage`` needs from a row: ``text`` (pre-training), ``sft`` (a reply to
train on), ``pairwise`` (a prompt with chosen and rejected replies) or ``kto`` (a reply and a
desirable/undesirable tag)."""


def stage_kind(stage: str) -> str:
    """The row kind a LLaMA-Factory ``stage`` reads (:data:`KINDS`)."""
    if stage not in KINDS:
        raise DatasetError(f"unknown stage {stage!r}; expected one of {', '.join(KINDS)}")
    return KINDS[stage]


def tools_field(row: dict[str, Any], spec: DatasetSpec, where: tuple[str, int]) -> str:
    """The row's tool list as a JSON string ("" when the dataset has no ``tools`` column or the row none)."""
    col = spec.columns.get("tools")
    if not col or row.get(col) in (None, ""):
        return ""
    value = row[col]
    problem = None
    if isinstance(value, (list, dict)):
        parsed, value = value, json.dumps(value, ensure_ascii=False)
    elif not isinstance(value, str):
        parsed, problem = None, f"expected a JSON list of function schemas, got {type(value).__name__}"
    else:
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            parsed, problem = None, f"not valid JSON ({exc.msg} at character {exc.pos})"
    if problem is None and not (isinstance(parsed, list) and all(isinstance(t, dict) for t in parsed)):
        problem = f"expected a JSON list of function schemas, got {str(parsed)[:60]!r}"
    if problem is not None:
        raise DatasetRowError(
            file=where[0],
            row=where[1],
            field=col,
            problem=problem,
            fix='write it as [{"name": ..., "description": ..., "parameters": {...}}, ...] (a JSON string or a list)',
        )
    return str(value)


def kto_field(row: dict[str, Any], spec: DatasetSpec, where: tuple[str, int]) -> bool:
    """The row's KTO tag: is its reply desirable."""
    col = spec.columns.get("kto_tag")
    if not col:
        raise DatasetRowError(
            file=where[0],
            row=where[1],
            field="kto_tag",
            problem=f"KTO training needs a desirable/undesirable tag, but dataset '{spec.name}' maps no kto_tag column",
            fix='add "columns": {"kto_tag": "<your bool column>"} to its dataset_info.json entry',
        )
    value = row.get(col)
    if not isinstance(value, bool):
        raise DatasetRowError(
            file=where[0],
            row=where[1],
            field=col,
            problem=f"expected true or false, got {str(value)[:60]!r}",
            fix="write the tag as a JSON boolean (true: a good reply, false: a bad one)",
        )
    return value


def check_ranking(spec: DatasetSpec, kind: str) -> None:
    """LLaMA-Factory's stage rule: preference data (``ranking``) only for preference training, and only it."""
    if spec.ranking and kind != "pairwise":
        raise DatasetError(
            f"dataset '{spec.name}' is preference data (ranking: true); it trains with stage: dpo or rm, "
            "not this stage. Fix: choose a supervised dataset, or set stage: dpo"
        )
    if kind == "pairwise" and not spec.ranking:
        raise DatasetError(
            f"dataset '{spec.name}' is not preference data; stage dpo/rm needs chosen and rejected replies. "
            'Fix: mark a preference dataset with "ranking": true and map its "chosen"/"rejected" columns'
        )
