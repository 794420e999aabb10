"""DatasetSpec: one LLaMA-Factory ``dataset_info.json`` entry, validated.

The keys, column names and tag names are LLaMA-Factory's, with its defaults. Keys that
LLaMA-Factory knows but finetune_kit cannot honour yet are refused here, all at once, so a
bad entry fails when the registry is read rather than when its rows are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from finetune_kit.data.formats import FORMATS, PLANNED_FORMATS
from finetune_kit.errors import ConfigError, did_you_mean

COLUMN_DEFAULTS = {"prompt": "instruction", "query": "input", "response": "output", "messages": "conversations"}
TAG_DEFAULTS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
KNOWN_COLUMNS = set(COLUMN_DEFAULTS) | {
    "history",
    "system",
    "tools",
    "images",
    "videos",
    "audios",
    "chosen",
    "rejected",
    "kto_tag",
}
"""Every ``columns`` key LLaMA-Factory knows."""
USED_COLUMNS = set(COLUMN_DEFAULTS) | {"history", "system", "tools", "chosen", "rejected", "kto_tag"}
"""The ``columns`` keys finetune_kit reads; the rest of :data:`KNOWN_COLUMNS` is refused as not supported yet."""
_SOURCES = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "file_name")
_UNSUPPORTED_SOURCES = ("om_hub_url", "script_url", "cloud_file_name")
_KEYS = set(_SOURCES) | {
    "formatting",
    "ranking",
    "subset",
    "split",
    "folder",
    "num_samples",
    "columns",
    "tags",
    "file_sha1",
}


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset_info.json entry: where the rows are and how to read them.

    Build it with :meth:`from_info`, which checks the entry. ``ms_hub_url`` is checked there but
    not kept: ModelScope alone is refused (next to ``hf_hub_url`` or ``file_name`` it is ignored).
    ``ranking`` marks preference data (chosen/rejected replies), which only preference training reads.

    Example::

        spec = DatasetSpec.from_info("mine", {"file_name": "mine.json", "columns": {"prompt": "q"}})
        spec.column("prompt")  # "q"
    """

    name: str
    file_name: str | None = None
    formatting: str = "alpaca"
    """A key of :data:`finetune_kit.data.formats.FORMATS`."""
    columns: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    split: str = "train"
    subset: str | None = None
    folder: str | None = None
    num_samples: int | None = None
    hf_hub_url: str | None = None
    ranking: bool = False

    def column(self, key: str) -> str:
        """The row column behind a ``columns`` key, with LLaMA-Factory's default name."""
        return self.columns.get(key, COLUMN_DEFAULTS.get(key, key))

    def tag(self, key: str) -> str:
        """The value of a ``tags`` key (sharegpt), with LLaMA-Factory's default."""
        return self.tags.get(key, TAG_DEFAULTS[key])

    @classmethod
    def from_info(cls, name: str, entry: Mapping[str, Any], where: str = "dataset_info.json") -> DatasetSpec:
        """Validate one dataset_info.json entry, reporting every problem at once (a :class:`ConfigError`)."""
        if not isinstance(entry, Mapping):
            raise ConfigError(
                f"entry '{name}' must be an object, got {type(entry).__name__}", header=f"Invalid {where}"
            )
        problems = _problems(name, entry)
        if problems:
            raise ConfigError(problems, header=f"Invalid {where}")
        return cls(
            name=name,
            file_name=entry.get("file_name"),
            formatting=entry.get("formatting", "alpaca"),
            columns=dict(entry.get("columns", {}) or {}),
            tags=dict(entry.get("tags", {}) or {}),
            split=entry.get("split", "train"),
            subset=entry.get("subset"),
            folder=entry.get("folder"),
            num_samples=entry.get("num_samples"),
            hf_hub_url=entry.get("hf_hub_url"),
            ranking=bool(entry.get("ranking", False)),
        )


def _problems(name: str, entry: Mapping[str, Any]) -> list[str]:
    problems = [f"'{name}': unknown key '{k}'.{did_you_mean(k, _KEYS)}" for k in sorted(set(entry) - _KEYS)]
    unsupported = [k for k in _UNSUPPORTED_SOURCES if entry.get(k)]
    if entry.get("ms_hub_url") and not entry.get("hf_hub_url") and not entry.get("file_name"):
        unsupported.append("ms_hub_url")
    problems += [
        f"'{name}': '{k}' datasets are not supported yet; download the file and use file_name" for k in unsupported
    ]
    if not any(entry.get(k) for k in _SOURCES):
        problems.append(f"'{name}': no file_name (or hf_hub_url / ms_hub_url) says where its rows are")
    formatting = entry.get("formatting", "alpaca")
    if not isinstance(formatting, str) or formatting not in FORMATS:
        extra = f" (the {formatting} format is planned)" if formatting in PLANNED_FORMATS else ""
        problems.append(f"'{name}': formatting {formatting!r} is not supported{extra}; use {_either(sorted(FORMATS))}")
    if not isinstance(entry.get("ranking", False), bool):
        problems.append(f"'{name}': ranking must be true or false, got {entry['ranking']!r}")
    columns = entry.get("columns", {}) or {}
    problems += [
        f"'{name}': unknown columns key '{k}'.{did_you_mean(k, KNOWN_COLUMNS)}"
        for k in sorted(set(columns) - KNOWN_COLUMNS)
    ]
    problems += [
        f"'{name}': the '{k}' column (images, videos, audios: multimodal data) is not supported; remove it from columns"
        for k in sorted(set(columns) & (KNOWN_COLUMNS - USED_COLUMNS))
    ]
    tags = entry.get("tags", {}) or {}
    problems += [
        f"'{name}': unknown tags key '{k}'.{did_you_mean(k, TAG_DEFAULTS)}"
        for k in sorted(set(tags) - set(TAG_DEFAULTS))
    ]
    return problems


def _either(names: list[str]) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
