"""Frozen, typed config dataclasses shared by the Python API, YAML files and the CLI.

Every stage's config subclasses :class:`StageConfig`. A field's ``help`` metadata is its
``--help`` text; ``__post_init__`` checks every field and raises one :class:`ConfigError`
listing all problems, so a bad value fails at the call that set it.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

from finetune_kit.errors import ConfigError, did_you_mean

C = TypeVar("C", bound="StageConfig")


def option(default: Any, help: str) -> Any:
    """Declare a config field with its default and its ``--help`` text."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Base of every config: validation, copying with changes, coercion from text."""

    section: ClassVar[str] = "config"

    def __post_init__(self) -> None:
        problems: list[str] = []
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                coerced = coerce(value, hints[f.name], f.name)
            except ValueError as exc:
                problems.append(str(exc))
                continue
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        if not problems:
            problems.extend(self._check())
        if problems:
            raise ConfigError(problems, header=f"Invalid {self.section} configuration")

    def _check(self) -> list[str]:
        """Cross-field checks of a subclass; return every problem found."""
        return []

    def with_(self: C, **changes: Any) -> C:
        """Return a copy with ``changes`` applied (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            names = [f.name for f in dataclasses.fields(self)]
            raise ConfigError(
                [f"unknown key '{k}' for {type(self).__name__}.{did_you_mean(k, names)}" for k in unknown]
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def help_of(cls, name: str) -> str:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}[name]

    def __repr__(self) -> str:
        defaults = type(self)() if _all_defaulted(type(self)) else None
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if defaults is None or getattr(defaults, f.name) != v:
                parts.append(f"{f.name}={v!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


def _all_defaulted(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}
_NONE = {"none", "null", "~", ""}


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """Turn YAML/CLI ``value`` into ``annotation``'s type, or raise ``ValueError`` saying why."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, name)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"{name}: got {value!r}")
    if origin is Literal:
        allowed = list(args)
        if value is False and "no" in allowed:  # YAML reads a bare `no` as false (save_strategy: no)
            return "no"
        if value in allowed:
            return value
        if isinstance(value, str):
            for a in allowed:
                if isinstance(a, str) and a.lower() == value.strip().lower():
                    return a
        hint = did_you_mean(str(value), [str(a) for a in allowed])
        raise ValueError(f"{name}: got {value!r}; expected one of {', '.join(map(repr, allowed))}.{hint}")
    if origin is tuple:
        inner = args[0] if args else str
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ValueError(f"{name}: got {value!r}; expected a comma-separated list")
        return tuple(coerce(v, inner, name) for v in items)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{name}: got {value!r}; expected true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise ValueError(f"{name}: got {value!r}; expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ValueError(f"{name}: got {value!r}; expected an integer")
    if annotation is float:
        if isinstance(value, bool):
            raise ValueError(f"{name}: got {value!r}; expected a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{name}: got {value!r}; expected a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{name}: got {value!r}; expected a string")
    return value
