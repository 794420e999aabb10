"""DatasetRegistry: LLaMA-Factory's dataset_info.json, read unchanged, plus datasets added in code."""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_kit.data.conversations import Conversations, ConversationStream, Example
from finetune_kit.data.formats.common import stage_kind
from finetune_kit.data.mix import MixStrategy, check_probs, mix
from finetune_kit.data.readers import check_dataset, read_dataset, stream_dataset
from finetune_kit.data.report import DataReport, build_report
from finetune_kit.data.spec import DatasetSpec
from finetune_kit.data.stream import interleave_stream
from finetune_kit.errors import ConfigError, DatasetError, DatasetRowError, DatasetRowsError, did_you_mean

if TYPE_CHECKING:
    from finetune_kit.data.template import ChatTemplate

logger = logging.getLogger("finetune_kit.data")


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
            raise DatasetError(
                f"{info} does not exist. Fix: point dataset_dir at the folder that holds "
                "dataset_info.json, or register datasets in code with DatasetRegistry().register(...)"
            )
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

    def register(
        self,
        name: str,
        file_name: str | os.PathLike[str],
        *,
        formatting: str = "alpaca",
        columns: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
        ranking: bool = False,
    ) -> DatasetRegistry:
        """Return a new registry with one more dataset; ``file_name`` may be absolute or relative to dataset_dir."""
        entry = {
            "file_name": str(file_name),
            "formatting": formatting,
            "columns": dict(columns or {}),
            "tags": dict(tags or {}),
            "ranking": ranking,
        }
        return replace(self, specs={**self.specs, name: DatasetSpec.from_info(name, entry, f"dataset '{name}'")})

    @property
    def names(self) -> list[str]:
        """Dataset names, in dataset_info.json order, then in registration order."""
        return list(self.specs)

    def spec(self, name: str) -> DatasetSpec:
        """The validated entry of one dataset; an unknown name suggests the close one."""
        if name not in self.specs:
            raise DatasetError(
                f"dataset '{name}' is not in {self.dataset_dir / 'dataset_info.json'}."
                f"{did_you_mean(name, self.specs)} Known: {', '.join(self.specs) or 'none'}"
            )
        return self.specs[name]

    def load(
        self,
        names: str | Iterable[str],
        *,
        max_samples: int | None = None,
        stage: str = "sft",
        skip_invalid: bool = False,
        mix_strategy: MixStrategy = "concat",
        interleave_probs: Sequence[float] | None = None,
        seed: int = 42,
    ) -> Conversations:
        """Read and check every row of the named datasets (comma-separated or a list).

        ``stage`` says what each row must hold (LLaMA-Factory's stage: ``sft``, ``pt`` text,
        ``dpo``/``rm`` preference pairs, ``kto`` tagged replies). Every bad row of every dataset
        is reported in one :class:`DatasetRowsError` (file, row, field and fix each); with
        ``skip_invalid=True`` they are dropped instead, and their count and places are logged.
        Several datasets are joined by ``mix_strategy`` (see :func:`~finetune_kit.data.mix.mix`).
        """
        wanted = self._names(names)
        kind = stage_kind(stage)
        parts: list[list[Example]] = []
        bad: list[DatasetRowError] = []
        for name in wanted:
            good, errors = read_dataset(self.spec(name), self.dataset_dir, max_samples, kind=kind)
            parts.append(good)
            bad += errors
        examples = [ex for part in parts for ex in part]
        if bad and not skip_invalid:
            raise DatasetRowsError(bad)
        if bad:
            places = "; ".join(f"{exc.file}, row {exc.row}" for exc in bad[:10])
            logger.warning(
                "skip_invalid: dropped %d bad row(s) of %d: %s%s",
                len(bad),
                len(bad) + len(examples),
                places,
                " ..." if len(bad) > 10 else "",
            )
        if not examples:
            raise DatasetError(f"no usable rows in {', '.join(wanted)}")
        if mix_strategy == "concat" and interleave_probs is None:
            return Conversations(tuple(examples), tuple(wanted), skipped=len(bad))
        loaded = [Conversations(tuple(part), (name,)) for part, name in zip(parts, wanted, strict=True)]
        return replace(mix(loaded, mix_strategy, interleave_probs, seed=seed), skipped=len(bad))

    def stream(
        self,
        names: str | Iterable[str],
        *,
        max_samples: int | None = None,
        stage: str = "sft",
        skip_invalid: bool = False,
        mix_strategy: MixStrategy = "concat",
        interleave_probs: Sequence[float] | None = None,
        seed: int = 42,
        buffer_size: int = 16384,
    ) -> ConversationStream:
        """Like :meth:`load`, but the rows are read and checked only as training consumes them.

        For files bigger than memory (``streaming: true``; train with ``max_steps``). A bad row
        raises its :class:`DatasetRowError` when it is reached (or is logged and skipped with
        ``skip_invalid``). ``concat`` reads the datasets one after the other; the interleave
        strategies draw from them at random with ``interleave_probs`` (equal chances by default).
        Training shuffles the rows in a buffer of ``buffer_size`` examples (seeded by ``seed``).
        """
        wanted = self._names(names)
        kind = stage_kind(stage)
        specs = [self.spec(n) for n in wanted]
        probs = check_probs(len(specs), mix_strategy, interleave_probs)

        def parts() -> list[Iterator[Example]]:
            return [
                stream_dataset(spec, self.dataset_dir, max_samples, kind=kind, skip_invalid=skip_invalid)
                for spec in specs
            ]

        def opened() -> Iterator[Example]:
            if mix_strategy == "concat":
                return itertools.chain.from_iterable(parts())
            return interleave_stream(parts, probs, until_all=mix_strategy == "interleave_over", seed=seed)

        return ConversationStream(opened, tuple(wanted), buffer_size=buffer_size, seed=seed)

    def report(
        self,
        names: str | Iterable[str],
        tokenizer: Any,
        template: ChatTemplate,
        *,
        cutoff_len: int,
        train_on_prompt: bool = False,
        mask_history: bool = False,
        max_samples: int | None = None,
    ) -> DataReport:
        """Rows, bad rows, token-length percentiles, truncation and trained share of each dataset.

        Example::

            report = registry.report("shop_alpaca", tokenizer, get_template("chatml"), cutoff_len=256)
            print(report)
            report.histogram("lengths.png")
        """
        return build_report(
            self,
            names,
            tokenizer,
            template,
            cutoff_len=cutoff_len,
            train_on_prompt=train_on_prompt,
            mask_history=mask_history,
            max_samples=max_samples,
        )

    @staticmethod
    def _names(names: str | Iterable[str]) -> list[str]:
        wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        wanted = [n for n in wanted if n]
        if not wanted:
            raise DatasetError("no dataset names given. Fix: dataset: name1,name2 (names from dataset_info.json)")
        return wanted

    def check(self, name: str, *, stage: str = "sft") -> tuple[int, list[str]]:
        """Check every row of one dataset without stopping at the first bad one.

        Returns the row count and one message per bad row (what ``data check`` prints). Hub
        datasets give ``(0, [])``: they are read, and checked, by :meth:`load`.

        Example::

            rows, problems = DatasetRegistry.from_dir("data").check("alpaca_zh_demo")
        """
        return check_dataset(self.spec(name), self.dataset_dir, kind=stage_kind(stage))
