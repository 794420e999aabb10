"""Dataset formats: the one registry of ``formatting`` names (dataset_info.json) and their converters.

Each format is a module exposing ``to_messages(row, spec, where) -> list[Message]``, which turns
one row into chat messages or raises :class:`~finetune_kit.errors.DatasetRowError`. Adding a format
means adding its module and one line to :data:`FORMATS`; ``DatasetSpec.from_info`` accepts every
name registered here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from finetune_kit.data.formats import alpaca, sharegpt
from finetune_kit.data.messages import Message

if TYPE_CHECKING:  # spec.py imports this registry to validate names, so the formats name DatasetSpec for types only
    from finetune_kit.data.spec import DatasetSpec

Converter = Callable[[Any, "DatasetSpec", tuple[str, int]], list[Message]]
"""``(row, spec, (file, row_index)) -> messages``."""

FORMATS: dict[str, Converter] = {
    "alpaca": alpaca.to_messages,
    "sharegpt": sharegpt.to_messages,
}

PLANNED_FORMATS = ("openai",)
"""LLaMA-Factory formats that are not supported yet; naming one gives a "planned" hint, not a typo hint."""
