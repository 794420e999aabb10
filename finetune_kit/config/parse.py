"""Reading a LLaMA-Factory-style YAML plus ``key=value`` and ``--key value`` overrides into typed configs.

One flat namespace of LLaMA-Factory key names is mapped onto the stage dataclasses: a key
fills every section that has a field of that name. Unknown and unsupported keys are
reported together, each with a hint, before anything runs.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, TypeVar

from finetune_kit.config.base import _FALSE, _NONE, StageConfig, coerce
from finetune_kit.config.compat import IGNORED, NEGATED, ONLY_FALSE, UNSUPPORTED
from finetune_kit.errors import ConfigError, UnknownKeysError, did_you_mean

logger = logging.getLogger("finetune_kit.config")
C = TypeVar("C", bound=StageConfig)


class Built(dict[type[StageConfig], StageConfig]):
    """The built sections, indexed by their class: ``built[LoraConfig]`` is typed ``LoraConfig``."""

    def __getitem__(self, cls: type[C]) -> C:
        value = super().__getitem__(cls)
        assert isinstance(value, cls)
        return value


Check = Callable[[Built], list[str]]

_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Load a YAML or JSON config file as a flat mapping of LLaMA-Factory keys."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist", header="Cannot read the config")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{p} is not valid YAML/JSON: {exc}", header="Cannot read the config") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p} must hold a mapping of keys to values, got {type(data).__name__}", header="Cannot read the config"
        )
    return data


def split_argv(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Separate config files from ``key=value`` / ``--key value`` / ``--key=value`` / ``--flag`` overrides."""
    files: list[str] = []
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key = arg[2:]
            if "=" in key:
                key, value = key.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--") and not _ASSIGNMENT.match(argv[i + 1]):
                value = argv[i + 1]
                i += 1
            else:
                value = "true"
            overrides[key.replace("-", "_")] = value
        elif "=" in arg and not Path(arg).exists():
            key, value = arg.split("=", 1)
            overrides[key] = value
        else:
            files.append(arg)
        i += 1
    return files, overrides


def collect(argv: Sequence[str]) -> dict[str, Any]:
    """All keys from the config files in ``argv``, then its overrides (later ones win)."""
    files, overrides = split_argv(argv)
    values: dict[str, Any] = {}
    for f in files:
        if not f.endswith((".yaml", ".yml", ".json")):
            raise ConfigError(
                f"unexpected argument {f!r}: expected a .yaml/.json file, key=value or --key value",
                header="Cannot read the command line",
            )
        values.update(read_config_file(f))
    values.update(overrides)
    return values


def build(values: Mapping[str, Any], sections: Sequence[type[StageConfig]], *, checks: Sequence[Check] = ()) -> Built:
    """Build one config per section from flat ``values``; report every problem together.

    Unknown keys (with a did-you-mean), unsupported LLaMA-Factory keys, bad values of every
    section and the cross-section ``checks`` (run on the built sections) all land in one
    :class:`ConfigError`. Keys in the compatibility table of ignored keys are dropped with a note.
    """
    known = {f.name for cls in sections for f in fields(cls)}
    problems: list[str] = []
    values = dict(values)
    for key in [k for k in values if k in NEGATED and NEGATED[k] in known]:
        try:
            flag = coerce(values.pop(key), bool, key)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        values.setdefault(NEGATED[key], not flag)
    for key in [k for k in values if k not in known]:
        if key in IGNORED:
            logger.info("'%s' is accepted for LLaMA-Factory compatibility and ignored: %s", key, IGNORED[key])
            del values[key]
        elif key in ONLY_FALSE and _is_false(values[key]):
            del values[key]
    unknown = [k for k in values if k not in known]
    typos = [k for k in unknown if k not in UNSUPPORTED and k not in ONLY_FALSE]
    for k in typos:
        problems.append(f"unknown key '{k}'.{did_you_mean(k, known)}")
    for k in unknown:
        if k in ONLY_FALSE:
            problems.append(f"{k}: true is not supported yet ({ONLY_FALSE[k]}). Fix: remove it or set {k}: false")
        elif k in UNSUPPORTED:
            problems.append(
                f"'{k}' is a LLaMA-Factory key that finetune_kit does not support yet "
                f"({UNSUPPORTED[k]}). Fix: remove it"
            )
    built = Built()
    for cls in sections:
        names = {f.name for f in fields(cls)}
        try:
            built[cls] = cls(**{k: v for k, v in values.items() if k in names})
        except ConfigError as exc:
            problems += [p for p in exc.problems if p not in problems]
    if len(built) == len(sections):
        for check in checks:
            problems += [p for p in check(built) if p not in problems]
    if problems:
        cls_err = UnknownKeysError if unknown else ConfigError
        raise cls_err(problems, header="Invalid configuration")
    return built


def _is_false(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in _FALSE | _NONE
    return value is None or value is False


def describe(sections: Sequence[type[StageConfig]]) -> str:
    """``--help`` text: every key of every section with its default and help."""
    lines = []
    for cls in sections:
        lines.append(f"\n{cls.section} keys ({cls.__name__}):")
        for f in fields(cls):
            default = (
                f.default
                if f.default is not MISSING
                else (f.default_factory() if f.default_factory is not MISSING else None)
            )
            default = ",".join(default) if isinstance(default, tuple) else default
            lines.append(f"  --{f.name:<34} {cls.help_of(f.name)} [default: {default}]")
    return "\n".join(lines)
