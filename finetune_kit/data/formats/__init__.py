"""Dataset formats. Each module exposes ``to_messages(row, spec, where) -> list[Message]``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from finetune_kit.data.formats import alpaca, sharegpt

Converter = Callable[[Any, Any, tuple[str, int]], list[dict[str, str]]]
FORMATS: dict[str, Converter] = {"alpaca": alpaca.to_messages, "sharegpt": sharegpt.to_messages}
