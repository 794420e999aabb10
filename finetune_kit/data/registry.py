"""DatasetRegistry: LLaMA-Factory's dataset_info.json, read unchanged, plus datasets added in code."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from finetune_kit.errors import ConfigError, DatasetError, did_you_mean

COLUMN_DEFAULTS = {"prompt": "instruction", "query": "input", "response": "output", "messages": "conversations"}
TAG_DEFAULTS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
KNOWN_COLUMNS = set(COLUMN_DEFAULTS) | {"history", "system", "tools", "images", "videos", "audios", "chosen",
                                        "rejected", "kto_tag"}
USED_COLUMNS = set(COLUMN_DEFAULTS) | {"history", "system"}
_SOURCES = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "file_name")
_KEYS = set(_SOURCES) | {"formatting", "ranking", "subset", "split", "folder", "num_samples", "columns", "tags",
                         "file_sha1"}


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset_info.json entry: where the rows are and how to read them."""

    name: str
    file_name: str | None = None
    formatting: Literal["alpaca", "sharegpt"] = "alpaca"
    columns: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    ranking: bool = False
    split: str = "train"
    subset: str | None = None
    folder: str | None = None
    num_samples: int | None = None
    hf_hub_url: str | None = None
    ms_hub_url: str | None = None

    def column(self, key: str) -> str:
        return self.columns.get(key, COLUMN_DEFAULTS.get(key, key))

    def tag(self, key: str) -> str:
        return self.tags.get(key, TAG_DEFAULTS[key])

    @classmethod
    def from_info(cls, name: str, entry: Mapping[str, Any], where: str = "dataset_info.json") -> DatasetSpec:
        """Validate one dataset_info.json entry, reporting every problem at once."""
        problems = []
        if not isinstance(entry, Mapping):
            raise ConfigError(f"entry '{name}' must be an object, got {type(entry).__name__}", header=f"Invalid {where}")
        unknown = sorted(set(entry) - _KEYS)
        problems += [f"'{name}': unknown key '{k}'.{did_you_mean(k, _KEYS)}" for k in unknown]
        unsupported = [k for k in ("om_hub_url", "script_url", "cloud_file_name") if entry.get(k)]
        if entry.get("ms_hub_url") and not entry.get("hf_hub_url") and not entry.get("file_name"):
            unsupported.append("ms_hub_url")
        problems += [f"'{name}': '{k}' datasets are not supported yet; download the file and use file_name"
                     for k in unsupported]
        if not any(entry.get(k) for k in _SOURCES):
            problems.append(f"'{name}': no file_name (or hf_hub_url / ms_hub_url) says where its rows are")
        formatting = entry.get("formatting", "alpaca")
        if formatting not in ("alpaca", "sharegpt"):
            extra = " (the openai format is planned)" if formatting == "openai" else ""
            problems.append(f"'{name}': formatting {formatting!r} is not supported{extra}; use alpaca or sharegpt")
        if entry.get("ranking"):
            problems.append(f"'{name}': ranking (preference) datasets need DPO training, which is not supported yet")
        columns = entry.get("columns", {}) or {}
        bad_cols = sorted(set(columns) - KNOWN_COLUMNS)
        problems += [f"'{name}': unknown columns key '{k}'.{did_you_mean(k, KNOWN_COLUMNS)}" for k in bad_cols]
        later = sorted(set(columns) & (KNOWN_COLUMNS - USED_COLUMNS))
        problems += [f"'{name}': the '{k}' column (tools, media or preference data) is not supported yet; remove it "
                     "from columns" for k in later]
        tags = entry.get("tags", {}) or {}
        bad_tags = sorted(set(tags) - set(TAG_DEFAULTS))
        problems += [f"'{name}': unknown tags key '{k}'.{did_you_mean(k, TAG_DEFAULTS)}" for k in bad_tags]
        if problems:
            raise ConfigError(problems, header=f"Invalid {where}")
        return cls(name=name, file_name=entry.get("file_name"), formatting=formatting, columns=dict(columns),
                   tags=dict(tags), ranking=bool(entry.get("ranking", False)), split=entry.get("split", "train"),
                   subset=entry.get("subset"), folder=entry.get("folder"), num_samples=entry.get("num_samples"),
                   hf_hub_url=entry.get("hf_hub_url"), ms_hub_url=entry.get("ms_hub_url"))


@dataclass(frozen=True)
class DatasetRegistry:
    """Named datasets, read from a ``dataset_info.json`` and/or registered in code.

    Example::

        registry = DatasetRegistry.from_dir("data")
        train = registry.load("alpaca_zh_demo,identity", max_samples=1000)
    """

    dataset_dir: Path = Path(".")
    specs: Mapping[str, DatasetSpec] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"DatasetRegistry({str(self.dataset_dir)!r}, {len(self.specs)} datasets: {', '.join(self.specs)})"

    @classmethod
    def from_dir(cls, dataset_dir: str | os.PathLike[str]) -> DatasetRegistry:
        """Read ``dataset_dir/dataset_info.json`` exactly as LLaMA-Factory does."""
        d = Path(dataset_dir).expanduser()
        info = d / "dataset_info.json"
        if not info.is_file():
            raise DatasetError(f"{info} does not exist. Fix: point dataset_dir at the folder that holds "
                               "dataset_info.json, or register datasets in code with DatasetRegistry().register(...)")
        try:
            data = json.loads(info.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{info}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
        if not isinstance(data, dict):
            raise DatasetError(f"{info}: expected an object mapping dataset names to entries")
        problems, specs = [], {}
        for name, entry in data.items():
            try:
                specs[name] = DatasetSpec.from_info(name, entry, str(info))
            except ConfigError as exc:
                problems += exc.problems
        if problems:
            raise ConfigError(problems, header=f"Invalid {info}")
        return cls(dataset_dir=d, specs=specs)

    @classmethod
    def demo(cls) -> DatasetRegistry:
        """The bundled e-commerce after-sales demo data (shop_alpaca, shop_sharegpt, shop_test)."""
        return cls.from_dir(Path(__file__).parent / "demo")

    def register(self, name: str, file_name: str | os.PathLike[str], *, formatting: str = "alpaca",
                 columns: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None) -> DatasetRegistry:
        """Return a new registry with one more dataset; ``file_name`` may be absolute or relative to dataset_dir."""
        entry = {"file_name": str(file_name), "formatting": formatting, "columns": dict(columns or {}),
                 "tags": dict(tags or {})}
        return replace(self, specs={**self.specs, name: DatasetSpec.from_info(name, entry, f"dataset '{name}'")})

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    def spec(self, name: str) -> DatasetSpec:
        if name not in self.specs:
            raise DatasetError(f"dataset '{name}' is not in {self.dataset_dir / 'dataset_info.json'}."
                               f"{did_you_mean(name, self.specs)} Known: {', '.join(self.specs) or 'none'}")
        return self.specs[name]

    def load(self, names: str | Iterable[str], *, max_samples: int | None = None) -> Any:
        """Read and check every row of the named datasets; returns :class:`Conversations`.

        A malformed row raises :class:`DatasetRowError` naming file, row and field; nothing is skipped.
        """
        from finetune_kit.data.conversations import Conversations, read_dataset

        wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        wanted = [n for n in wanted if n]
        if not wanted:
            raise DatasetError("no dataset names given. Fix: dataset: name1,name2 (names from dataset_info.json)")
        examples = []
        for name in wanted:
            examples += read_dataset(self.spec(name), self.dataset_dir, max_samples)
        return Conversations(tuple(examples), tuple(wanted))
