"""Conversations: checked, normalized examples, ready to split, tokenize or prompt a model."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_kit.data.formats import FORMATS
from finetune_kit.errors import DatasetError

if TYPE_CHECKING:
    from finetune_kit.data.registry import DatasetSpec
    from finetune_kit.data.tokenize import TokenizedDataset
    from finetune_kit.models.loaded import LoadedModel


@dataclass(frozen=True)
class Example:
    """One conversation (an optional system message, then user/assistant turns) and where it came from."""

    messages: tuple[dict[str, str], ...]
    source: str  # "file, row N" for error messages and reports

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """Everything before the last reply: what a model is asked at prediction time."""
        return list(self.messages[:-1])

    @property
    def label(self) -> str:
        """The last reply: the reference answer for prediction metrics."""
        return self.messages[-1]["content"]


def read_dataset(spec: DatasetSpec, dataset_dir: Path, max_samples: int | None) -> list[Example]:
    """Read, convert and check the rows of one dataset (first ``max_samples`` rows if given)."""
    convert = FORMATS[spec.formatting]
    if spec.file_name:
        from finetune_kit.data.readers import read_rows

        path = Path(spec.file_name)
        rows = read_rows(path if path.is_absolute() else dataset_dir / path)
    else:
        rows = _read_hub(spec)
    if spec.num_samples is not None:
        rows = _sample(rows, spec.num_samples)
    if max_samples is not None:
        rows = rows[:max_samples]
    if not rows:
        raise DatasetError(f"dataset '{spec.name}' has no rows")
    return [Example(tuple(convert(row, spec, (file, i))), f"{file}, row {i}") for file, i, row in rows]


def check_dataset(spec: DatasetSpec, dataset_dir: Path) -> tuple[int, list[str]]:
    """Check every row of a dataset; return the row count and one message per bad row."""
    from finetune_kit.data.readers import read_rows
    from finetune_kit.errors import DatasetRowError

    convert = FORMATS[spec.formatting]
    path = Path(spec.file_name) if spec.file_name else None
    if path is None:
        return 0, []  # hub datasets are read (and checked) at load time
    rows = read_rows(path if path.is_absolute() else dataset_dir / path)
    errors = []
    for file, i, row in rows:
        try:
            convert(row, spec, (file, i))
        except DatasetRowError as exc:
            errors.append(str(exc))
    return len(rows), errors


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
        raise DatasetError(f"dataset '{spec.name}': cannot load {url!r} from the hub ({type(exc).__name__}: {exc}). "
                           "Fix: download the files and point file_name at them") from exc
    return [(str(url), i, row) for i, row in enumerate(ds)]


@dataclass(frozen=True)
class Conversations:
    """A list of checked :class:`Example` objects from one or more datasets."""

    examples: tuple[Example, ...]
    names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    def __repr__(self) -> str:
        turns = sum(sum(m["role"] == "assistant" for m in e.messages) for e in self.examples)
        return f"Conversations({', '.join(self.names) or 'in-memory'}: {len(self)} examples, {turns} replies)"

    def head(self, n: int) -> Conversations:
        return Conversations(self.examples[:n], self.names)

    def split(self, val_size: float, *, seed: int = 42) -> tuple[Conversations, Conversations]:
        """Shuffle and hold out ``val_size`` (a fraction < 1 or a row count) for evaluation."""
        n = len(self)
        n_val = int(val_size) if val_size >= 1 else math.ceil(n * val_size)
        if not 0 < n_val < n:
            raise DatasetError(f"val_size={val_size} holds out {n_val} of {n} rows; it must leave at least one row "
                               "on each side")
        order = list(range(n))
        random.Random(seed).shuffle(order)
        pick = lambda idx: Conversations(tuple(self.examples[i] for i in sorted(idx)), self.names)  # noqa: E731
        return pick(order[n_val:]), pick(order[:n_val])

    def tokenize(self, model: LoadedModel, *, cutoff_len: int = 2048, train_on_prompt: bool = False,
                 mask_history: bool = False) -> TokenizedDataset:
        """Encode with the model's chat template; prompt tokens get label -100 (unless ``train_on_prompt``)."""
        from finetune_kit.data.tokenize import tokenize

        return tokenize(self, model.tokenizer, model.template, cutoff_len=cutoff_len,
                        train_on_prompt=train_on_prompt, mask_history=mask_history)
