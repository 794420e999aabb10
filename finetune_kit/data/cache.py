"""The tokenized-data cache: encode once, then load the result from disk in well under a second.

:func:`tokenize_cached` keys the result of :func:`~finetune_kit.data.tokenize.tokenize` by a hash
of everything that decides it: the data (the bytes of every file behind the datasets, or the
examples themselves), the tokenizer (its full definition and special tokens), the template and
the encoding options (stage, cutoff_len, masking, packing, finetune_kit's version). A folder
``$FINETUNE_KIT_CACHE/tokenized/<key>/`` holds the Arrow files and a record of how they were
made; it is written atomically, so an interrupted run leaves nothing half-written.

LLaMA-Factory's ``tokenized_path`` is honoured too: when the folder exists it is loaded (even
one LLaMA-Factory wrote), else the data is tokenized and saved there.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_kit._artifacts import provenance, read_record, write_record
from finetune_kit._fs import atomic_dir
from finetune_kit._version import __version__
from finetune_kit.data.conversations import Conversations, Example
from finetune_kit.data.mix import MixStrategy
from finetune_kit.data.readers import data_files
from finetune_kit.data.registry import DatasetRegistry
from finetune_kit.data.tokenize import TokenizedDataset, fitted, read_arrow_files, tokenize, tokenize_to_dir
from finetune_kit.errors import DatasetError

if TYPE_CHECKING:
    from finetune_kit.data.template import ChatTemplate

logger = logging.getLogger("finetune_kit.data")

TOKENIZED_RECORD = "finetune_kit_tokenized.json"
"""The record next to a tokenized dataset's Arrow files: how it was made, and its cache key."""
CACHE_FORMAT = 1
"""Bumped when the folder layout or an encoder's output changes, so older folders stop matching."""


def tokenized_cache_dir() -> Path:
    """``$FINETUNE_KIT_CACHE/tokenized``, else the platform's user cache dir for finetune_kit."""
    env = os.environ.get("FINETUNE_KIT_CACHE")
    if env:
        return Path(env).expanduser() / "tokenized"
    import platformdirs

    return Path(platformdirs.user_cache_dir("finetune_kit")) / "tokenized"


@dataclass(frozen=True)
class DataSelection:
    """Which data to read, without reading it: datasets of a registry, their row limit and mixing.

    :func:`tokenize_cached` given a selection hashes the files behind it instead of the rows, so a
    cache hit does not even read the data. :meth:`load` reads it with ``DatasetRegistry.load``
    and these arguments. ``names`` may also be one comma-separated string.

    Example::

        selection = DataSelection(DatasetRegistry.from_dir("data"), ("alpaca_zh_demo", "identity"))
        tokens = tokenize_cached(selection, tokenizer, template, cutoff_len=1024)
    """

    registry: DatasetRegistry
    names: tuple[str, ...]
    max_samples: int | None = None
    stage: str = "sft"
    skip_invalid: bool = False
    mix_strategy: MixStrategy = "concat"
    interleave_probs: tuple[float, ...] | None = None
    seed: int = 42

    def __post_init__(self) -> None:
        names = self.names.split(",") if isinstance(self.names, str) else self.names
        object.__setattr__(self, "names", tuple(n.strip() for n in names if n.strip()))
        for name in self.names:
            self.registry.spec(name)  # an unknown name fails here, with a suggestion

    def __repr__(self) -> str:
        extra = f", max_samples={self.max_samples}" if self.max_samples is not None else ""
        mixing = f", {self.mix_strategy}, probs={list(self.interleave_probs or [])}, seed={self.seed}"
        mixing = "" if self.mix_strategy == "concat" and self.interleave_probs is None else mixing
        return f"DataSelection({','.join(self.names)}{extra}, stage={self.stage}{mixing})"

    def load(self) -> Conversations:
        """Read, check and mix the rows: ``DatasetRegistry.load`` with these arguments."""
        return self.registry.load(
            self.names,
            max_samples=self.max_samples,
            stage=self.stage,
            skip_invalid=self.skip_invalid,
            mix_strategy=self.mix_strategy,
            interleave_probs=self.interleave_probs,
            seed=self.seed,
        )

    def fingerprint(self) -> str | None:
        """A hash of the selection and of every file behind it; None when a dataset comes from a hub."""
        h = hashlib.sha256(repr(self._settings()).encode())
        for name in self.names:
            spec = self.registry.spec(name)
            if not spec.file_name:
                return None
            h.update(repr(spec).encode())
            path = Path(spec.file_name)
            for f in data_files(path if path.is_absolute() else self.registry.dataset_dir / path):
                h.update(f.name.encode() + b"\0" + _file_digest(f))
        return h.hexdigest()

    def _settings(self) -> tuple[Any, ...]:
        probs = self.interleave_probs
        return (self.names, self.max_samples, self.stage, self.skip_invalid, self.mix_strategy, probs, self.seed)


def tokenize_cached(
    data: Conversations | DataSelection | Iterable[Example],
    tokenizer: Any,
    template: ChatTemplate,
    *,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    stage: str = "sft",
    packing: bool | None = None,
    neat_packing: bool = False,
    num_workers: int = 1,
    cache: bool = True,
    tokenized_path: str | os.PathLike[str] | None = None,
) -> TokenizedDataset:
    """:func:`~finetune_kit.data.tokenize.tokenize`, answered from disk when it was done before.

    ``data`` is the examples, or a :class:`DataSelection` (then a cache hit skips reading the data
    too). With ``cache`` the result lives in ``$FINETUNE_KIT_CACHE/tokenized/<key>/``.
    ``tokenized_path`` is LLaMA-Factory's option: an existing folder is loaded as it is (like
    LLaMA-Factory, the data and options given are then not used; a warning says when they differ
    from what the folder was made from), a missing one is created with the result. The other
    keywords are :func:`tokenize`'s; ``num_workers`` does not change the result, so it is not
    part of the key.

    Example::

        tokens = tokenize_cached(train, tokenizer, get_template("chatml"), cutoff_len=1024, num_workers=4)
        again = tokenize_cached(train, tokenizer, get_template("chatml"), cutoff_len=1024)  # from disk
    """
    options: dict[str, Any] = dict(
        cutoff_len=cutoff_len,
        train_on_prompt=train_on_prompt,
        mask_history=mask_history,
        stage=stage,
        packing=packing,
        neat_packing=neat_packing,
    )
    names = _names_of(data)
    if not cache and tokenized_path is None:
        return tokenize(_examples(data), tokenizer, template, num_workers=num_workers, **options)
    given = Path(tokenized_path).expanduser() if tokenized_path is not None else None
    if given is not None and given.is_dir() and any(given.iterdir()):
        return _load_given(given, data, tokenizer, template, names, options)
    data, data_hash = _hashed(data)
    key, parts = _key(data_hash, tokenizer, template, options)
    target = given or tokenized_cache_dir() / key
    if (target / TOKENIZED_RECORD).is_file():
        logger.info("Loaded tokenized data from the cache %s", target)
        return load_tokenized(target, tokenizer=fitted(tokenizer, template), names=names)
    with atomic_dir(target) as tmp:
        done = tokenize_to_dir(_examples(data), tokenizer, template, tmp, num_workers=num_workers, **options)
        record = provenance(
            "cache",
            model=None,
            template=template.name,
            datasets=done.names or names,
            config={"encoding": options, "format": CACHE_FORMAT},
            key=key,
            key_parts=parts,
            rows=len(done),
            truncated=done.truncated,
            files=sorted(p.name for p in tmp.glob("data-*.arrow")),
        )
        write_record(tmp, TOKENIZED_RECORD, record)
    logger.info("Saved tokenized data to %s", target)
    return load_tokenized(target, tokenizer=done.tokenizer, names=done.names or names)


def load_tokenized(
    path: str | os.PathLike[str], *, tokenizer: Any = None, names: Sequence[str] = ()
) -> TokenizedDataset:
    """A tokenized dataset saved by :func:`tokenize_cached` (memory-mapped, so it loads at once)."""
    folder = Path(path).expanduser()
    record_path = folder / TOKENIZED_RECORD
    if not record_path.is_file():
        raise DatasetError(
            f"{folder} holds no {TOKENIZED_RECORD}: it was not written by finetune_kit's tokenize_cached. "
            "Fix: point tokenized_path at such a folder, or at a new one to create it"
        )
    record = read_record(record_path)
    encoding = record["config"]["encoding"]
    dataset = read_arrow_files([folder / name for name in record["files"]])
    return TokenizedDataset(
        dataset,
        encoding["cutoff_len"],
        record["truncated"],
        template=record["template"] or "",
        train_on_prompt=encoding["train_on_prompt"],
        mask_history=encoding["mask_history"],
        names=tuple(names) or tuple(record["datasets"]),
        tokenizer=tokenizer,
        stage=encoding["stage"],
    )


def cache_key(
    data: Conversations | DataSelection | Iterable[Example], tokenizer: Any, template: ChatTemplate, **options: Any
) -> tuple[str, dict[str, str]]:
    """The cache key of one tokenization and the hashes it is made of (data, tokenizer, template, options).

    ``tokenizer`` is the one given to :func:`tokenize_cached`: fitting it to the template is
    decided by the two, so it needs no hash of its own.
    """
    return _key(_hashed(data)[1], tokenizer, template, options)


def tokenizer_digest(tokenizer: Any) -> str:
    """A hash of what decides a tokenizer's ids: its full definition, special tokens and class."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:  # a slow (Python) tokenizer: its vocabulary and added tokens
        body = repr(sorted(tokenizer.get_vocab().items())) + repr(getattr(tokenizer, "added_tokens_decoder", ""))
    return _digest(
        type(tokenizer).__name__,
        body,
        repr(sorted(tokenizer.special_tokens_map.items())),
        repr(tokenizer.all_special_tokens),
        repr((getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None))),
        repr((tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)),
        str(getattr(tokenizer, "chat_template", "")),
    )


# ----- helpers ---------------------------------------------------------------------------------
def _key(data_hash: str, tokenizer: Any, template: ChatTemplate, options: dict[str, Any]) -> tuple[str, dict[str, str]]:
    parts = {
        "data": data_hash,
        "tokenizer": tokenizer_digest(tokenizer),
        "template": _digest(repr(template), template.native_jinja or ""),
        "options": _digest(repr(sorted(options.items())), __version__, str(CACHE_FORMAT)),
    }
    return _digest(*parts.values())[:32], parts


def _hashed(data: Conversations | DataSelection | Iterable[Example]) -> tuple[Any, str]:
    """The data ready to encode (read at most once) and its hash: of the files behind a selection, else of the rows."""
    if isinstance(data, DataSelection):
        fingerprint = data.fingerprint()
        if fingerprint is not None:
            return data, fingerprint
        data = data.load()
    if not isinstance(data, (Conversations, list, tuple)):
        data = list(data)  # iterated twice: hashed, then encoded
    return data, _examples_digest(data)


def _load_given(
    target: Path,
    data: Conversations | DataSelection | Iterable[Example],
    tokenizer: Any,
    template: ChatTemplate,
    names: tuple[str, ...],
    options: dict[str, Any],
) -> TokenizedDataset:
    """An existing ``tokenized_path``: ours (compared with what it would be made from), or LLaMA-Factory's."""
    fit = fitted(tokenizer, template)
    if not (target / TOKENIZED_RECORD).is_file():
        return _load_llamafactory(target, fit, template, names, options)
    record = read_record(target / TOKENIZED_RECORD)
    # the data is compared only when that is cheap (it is not read for this, as LLaMA-Factory does not)
    data_hash = data.fingerprint() if isinstance(data, DataSelection) else None
    if isinstance(data, (Conversations, list, tuple)):
        data_hash = _examples_digest(data)
    _, parts = _key(data_hash or "", tokenizer, template, options)
    theirs = record.get("key_parts", {})
    changed = [k for k, v in parts.items() if theirs.get(k) != v and (k != "data" or data_hash)]
    if changed:
        logger.warning(
            "tokenized_path %s was made from other %s; loading it anyway, as LLaMA-Factory does "
            "(delete the folder to tokenize again)",
            target,
            ", ".join(changed),
        )
    logger.info("Loaded tokenized data from tokenized_path %s", target)
    return load_tokenized(target, tokenizer=fit, names=names)


def _load_llamafactory(
    target: Path, tokenizer: Any, template: ChatTemplate, names: tuple[str, ...], options: dict[str, Any]
) -> TokenizedDataset:
    """A ``tokenized_path`` LLaMA-Factory saved (a DatasetDict, or a Dataset): its train split."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(target))
    except Exception as exc:
        raise DatasetError(
            f"tokenized_path {target} exists but holds no tokenized dataset ({type(exc).__name__}: {exc}). "
            "Fix: point tokenized_path at a new folder to create it, or at one tokenize_cached or LLaMA-Factory wrote"
        ) from exc
    if isinstance(saved, datasets.DatasetDict):
        if "train" not in saved:
            raise DatasetError(f"tokenized_path {target} has splits {list(saved)} but no 'train' split")
        saved = saved["train"]
    logger.warning("Loaded LLaMA-Factory's tokenized dataset from %s; other data arguments are ignored", target)
    return TokenizedDataset(
        saved,
        options["cutoff_len"],
        0,
        template=template.name,
        train_on_prompt=options["train_on_prompt"],
        mask_history=options["mask_history"],
        names=names,
        tokenizer=tokenizer,
        stage=options["stage"],
    )


def _examples(data: Conversations | DataSelection | Iterable[Example]) -> Iterable[Example]:
    return data.load() if isinstance(data, DataSelection) else data


def _names_of(data: Any) -> tuple[str, ...]:
    return tuple(getattr(data, "names", ()))


def _examples_digest(examples: Iterable[Example]) -> str:
    """A hash of every example's content (not its source: moving the files keeps the cache)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(repr((ex.messages, ex.tools, ex.rejected, ex.kto_tag)).encode())
    return h.hexdigest()


def _file_digest(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


def _digest(*texts: str) -> str:
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode() + b"\0")
    return h.hexdigest()
