"""Stage inputs that stand for a model: a :class:`LoadedModel`, or anything whose ``load()`` gives one.

``Evaluator``, ``Exporter`` and ``Server`` accept a ``LoadedModel``, a ``ModelSource``, a
``TrainResult`` (which hands over its in-memory model) or an ``ExportedModel``; this module
turns each into what the stage needs, with one error message for the wrong type.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from finetune_kit.models.engine import Engine
from finetune_kit.models.loaded import LoadedModel


@runtime_checkable
class Loadable(Protocol):
    """Anything that gives a :class:`LoadedModel`: ``ModelSource``, ``TrainResult``, ``ExportedModel``."""

    def load(self) -> LoadedModel: ...


def as_loaded(model: object, *, who: str) -> LoadedModel:
    """``model`` itself if it is a :class:`LoadedModel`, else ``model.load()``; a clear TypeError otherwise."""
    if isinstance(model, LoadedModel):
        return model
    load = getattr(model, "load", None)
    if callable(load):
        loaded = load()
        if isinstance(loaded, LoadedModel):
            return loaded
        raise TypeError(f"{type(model).__name__}.load() returned {type(loaded).__name__}, not a LoadedModel")
    raise TypeError(
        f"{who} needs a LoadedModel or something with .load() (a ModelSource, TrainResult or "
        f"ExportedModel); got {type(model).__name__}. Fix: {who}(ModelSource.bundled().load())"
    )


def as_engine(model: object, *, who: str) -> Engine:
    """An :class:`Engine` as it is (a LoadedModel or another backend), else ``as_loaded(model)``."""
    if isinstance(model, Engine):
        return model
    return as_loaded(model, who=who)
