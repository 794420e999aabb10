"""Dataset formats: the one registry of ``formatting`` names (dataset_info.json) and their converters.

Each format is a function ``(row, spec, (file, row_index), kind) -> Example`` that turns one row
into a checked :class:`~finetune_kit.data.conversations.Example` for what the training stage
needs (``kind``: see :data:`~finetune_kit.data.formats.common.KINDS`), or raises
:class:`~finetune_kit.errors.DatasetRowError`. Adding a format means one line in :data:`FORMATS`;
``DatasetSpec.from_info`` accepts every name registered here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from finetune_kit.data.formats import alpaca, sharegpt

if TYPE_CHECKING:  # spec.py imports this registry to validate names, so the formats name DatasetSpec for types only
    from finetune_kit.data.conversations import Example
    from finetune_kit.data.spec import DatasetSpec

Converter = Callable[[Any, "DatasetSpec", tuple[str, int], str], "Example"]
"""``(row, spec, (file, row_index), kind) -> Example``."""

FORMATS: dict[str, Converter] = {
    "alpaca": alpaca.to_example,
    "sharegpt": sharegpt.to_example,
    "openai": sharegpt.to_example_openai,
}

PLANNED_FORMATS: tuple[str, ...] = ()
"""LLaMA-Factory formats that are not supported yet; naming one gives a "planned" hint, not a typo hint."""
