"""Row checks shared by the dataset formats."""

from __future__ import annotations

from typing import Any

from finetune_kit.errors import DatasetRowError


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
