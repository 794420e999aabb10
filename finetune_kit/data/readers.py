"""Reading datasets: rows from files (json, jsonl, csv, parquet, arrow; a file or a folder of them)
or from the Hugging Face Hub, converted by their format into checked :class:`Example` objects."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from finetune_kit.data.conversations import Example
from finetune_kit.data.formats import FORMATS
from finetune_kit.data.formats.common import KINDS, check_ranking
from finetune_kit.data.spec import DatasetSpec
from finetune_kit.errors import DatasetError, DatasetRowError

logger = logging.getLogger("finetune_kit.data")

FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def read_dataset(
    spec: DatasetSpec, dataset_dir: Path, max_samples: int | None, *, kind: str = "sft", sample: bool = True
) -> tuple[list[Example], list[DatasetRowError]]:
    """Read, convert and check the rows of one dataset (first ``max_samples`` rows if given).

    Returns the good examples and an error for every bad row: nothing is dropped silently, the
    caller decides. A relative ``file_name`` is read from ``dataset_dir``; without one, rows come
    from ``hf_hub_url``. ``num_samples`` is applied before ``max_samples``, as in LLaMA-Factory.
    ``kind`` is what the training stage needs of a row (``formats.common.KINDS``); ``sample=False``
    reads every row once, ignoring ``num_samples`` (for checking a file).
    """
    if kind not in set(KINDS.values()):
        raise DatasetError(f"unknown row kind {kind!r}; expected one of {', '.join(sorted(set(KINDS.values())))}")
    check_ranking(spec, kind)
    if kind == "kto" and not spec.columns.get("kto_tag"):
        raise DatasetError(
            f"dataset '{spec.name}': KTO training needs a desirable/undesirable tag per row, but its entry maps no "
            'kto_tag column. Fix: add "columns": {"kto_tag": "<your bool column>"} to dataset_info.json'
        )
    convert = FORMATS[spec.formatting]
    if spec.file_name:
        path = Path(spec.file_name)
        rows = read_rows(path if path.is_absolute() else dataset_dir / path)
    else:
        rows = _read_hub(spec)
    if spec.num_samples is not None and sample:
        rows = _sample(rows, spec.num_samples)
    if max_samples is not None:
        rows = rows[:max_samples]
    if not rows:
        raise DatasetError(f"dataset '{spec.name}' has no rows")
    examples, bad = [], []
    for file, i, row in rows:
        try:
            examples.append(convert(row, spec, (file, i), kind))
        except DatasetRowError as exc:
            bad.append(exc)
    return examples, bad


def check_dataset(spec: DatasetSpec, dataset_dir: Path, *, kind: str = "sft") -> tuple[int, list[str]]:
    """Check every row of a dataset file; return the row count and one message per bad row.

    Hub datasets give ``(0, [])``: they are read, and checked, when loaded.
    """
    if not spec.file_name:
        return 0, []
    examples, bad = read_dataset(spec, dataset_dir, None, kind=kind, sample=False)
    return len(examples) + len(bad), [str(exc) for exc in bad]


def stream_dataset(
    spec: DatasetSpec, dataset_dir: Path, max_samples: int | None, *, kind: str = "sft", skip_invalid: bool = False
) -> Iterator[Example]:
    """Convert the rows of one dataset file as they are read, without holding the file in memory.

    A bad row raises its :class:`DatasetRowError` when it is met (file, row, field and fix), or
    with ``skip_invalid`` is logged and skipped. ``num_samples`` does not apply (as in
    LLaMA-Factory's streaming mode); ``max_samples`` stops after that many rows.
    """
    check_ranking(spec, kind)
    if not spec.file_name:
        raise DatasetError(f"dataset '{spec.name}': streaming reads local files; download the hub dataset first")
    convert = FORMATS[spec.formatting]
    path = Path(spec.file_name)
    rows = iter_rows(path if path.is_absolute() else dataset_dir / path)
    seen = 0
    for file, i, row in rows:
        if max_samples is not None and seen >= max_samples:
            return
        seen += 1
        try:
            yield convert(row, spec, (file, i), kind)
        except DatasetRowError as exc:
            if not skip_invalid:
                raise
            logger.warning("skip_invalid: dropped %s", exc)


def iter_rows(path: Path) -> Iterator[tuple[str, int, Any]]:
    """``(file, row_index, row)`` for every row behind ``path``, read lazily.

    JSON Lines, CSV, parquet and arrow files are read row by row (batch by batch); a ``.json``
    file holding one JSON array is parsed whole — save big data as ``.jsonl`` to stream it.
    """
    for f in data_files(path):
        suffix = f.suffix.lower()
        if suffix == ".jsonl" or (suffix == ".json" and _starts_with(f, "{")):
            items: Iterable[Any] = _iter_jsonl(f)
        elif suffix == ".json":
            items = _read_json(f)
        elif suffix == ".parquet":
            items = _iter_parquet(f)
        else:
            items = _read_with_datasets(f, FILE_TYPES[suffix], streaming=True)
        for i, item in enumerate(items):
            yield str(f), i, item


def _starts_with(f: Path, char: str) -> bool:
    with f.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                return line.lstrip().startswith(char)
    return False


def _iter_jsonl(f: Path) -> Iterator[Any]:
    with f.open(encoding="utf-8") as handle:
        row = 0
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{f}, line {lineno} (row {row}): not valid JSON: {exc.msg}") from exc
            row += 1


def _iter_parquet(f: Path) -> Iterator[Any]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _sample(rows: list[Any], n: int) -> list[Any]:
    """LLaMA-Factory's num_samples: a random subset, or all rows plus random repeats when n is larger."""
    rng = random.Random(0)
    if n <= len(rows):
        return rng.sample(rows, n)
    return rows + [rng.choice(rows) for _ in range(n - len(rows))]


def _read_hub(spec: DatasetSpec) -> list[tuple[str, int, Any]]:
    import datasets

    url = spec.hf_hub_url
    try:
        ds = datasets.load_dataset(url, name=spec.subset, data_dir=spec.folder, split=spec.split)
    except Exception as exc:
        raise DatasetError(
            f"dataset '{spec.name}': cannot load {url!r} from the hub ({type(exc).__name__}: {exc}). "
            "Fix: download the files and point file_name at them"
        ) from exc
    return [(str(url), i, row) for i, row in enumerate(ds)]


def data_files(path: Path) -> list[Path]:
    """The files behind ``file_name``: the file itself, or every file of one type in a folder."""
    if not path.exists():
        raise DatasetError(
            f"dataset file {path} does not exist. Fix: check file_name in dataset_info.json "
            "(it is relative to dataset_dir)"
        )
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
        items: Iterable[Any]
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


def _read_with_datasets(f: Path, kind: str, *, streaming: bool = False) -> Iterable[Any]:
    import datasets

    if kind == "arrow":
        ds = datasets.Dataset.from_file(str(f))  # memory-mapped: rows are read as they are used
    else:
        ds = datasets.load_dataset(kind, data_files=str(f), split="train", streaming=streaming)
    return ds if streaming else list(ds)
