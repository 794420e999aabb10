"""Reading rows from dataset files: json, jsonl, csv, parquet, arrow (a file or a folder of them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune_kit.errors import DatasetError

FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def data_files(path: Path) -> list[Path]:
    """The files behind ``file_name``: the file itself, or every file of one type in a folder."""
    if not path.exists():
        raise DatasetError(f"dataset file {path} does not exist. Fix: check file_name in dataset_info.json "
                           "(it is relative to dataset_dir)")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    if not files:
        raise DatasetError(f"dataset folder {path} holds no files")
    kinds = {p.suffix.lower() for p in files}
    if len(kinds) > 1:
        raise DatasetError(f"dataset folder {path} mixes file types {sorted(kinds)}; all files must share one type")
    kind = kinds.pop()
    if kind not in FILE_TYPES:
        raise DatasetError(f"{files[0]}: unsupported file type '{kind}'. Allowed: {', '.join(sorted(FILE_TYPES))}")
    return files


def read_rows(path: Path) -> list[tuple[str, int, Any]]:
    """Return ``(file, row_index, row)`` for every row of every file behind ``path``."""
    rows: list[tuple[str, int, Any]] = []
    for f in data_files(path):
        suffix = f.suffix.lower()
        if suffix == ".json":
            items = _read_json(f)
        elif suffix == ".jsonl":
            items = _read_jsonl(f)
        else:
            items = _read_with_datasets(f, FILE_TYPES[suffix])
        rows.extend((str(f), i, item) for i, item in enumerate(items))
    return rows


def _read_json(f: Path) -> list[Any]:
    text = f.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("{") and "\n{" in text:
            return _read_jsonl(f)  # JSON Lines saved with a .json suffix, as LLaMA-Factory accepts
        raise DatasetError(f"{f}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    if isinstance(data, dict) and len(text.strip().splitlines()) == 1:
        return [data]  # one JSON Lines row in a .json file
    if isinstance(data, dict):
        raise DatasetError(f"{f}: the top level is an object; expected a list of rows ([{{...}}, {{...}}])")
    if not isinstance(data, list):
        raise DatasetError(f"{f}: the top level is {type(data).__name__}; expected a list of rows")
    return data


def _read_jsonl(f: Path) -> list[Any]:
    items = []
    for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{f}, line {lineno} (row {len(items)}): not valid JSON: {exc.msg}") from exc
    return items


def _read_with_datasets(f: Path, kind: str) -> list[Any]:
    import datasets

    if kind == "arrow":
        ds = datasets.Dataset.from_file(str(f))
    else:
        ds = datasets.load_dataset(kind, data_files=str(f), split="train")
    return list(ds)
