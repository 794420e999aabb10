"""What one board process holds (its training run, its models, its work folder) and the pieces every tab shares."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_kit.errors import FinetuneKitError
from finetune_kit.webui.models import ModelCache, ModelChoice
from finetune_kit.webui.runner import TrainingRun
from finetune_kit.webui.texts import error_text, info, text

logger = logging.getLogger("finetune_kit.webui")


class Board:
    """The state behind the page: one :class:`TrainingRun`, the :class:`ModelCache`, and a work folder.

    Every browser tab shares it, as LLaMA Board's single runner is shared: one training at a time.
    ``work_dir`` receives each run's YAML and console log (default: a new temporary folder).
    """

    def __init__(self, work_dir: str | Path | None = None) -> None:
        self.work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="finetune-kit-board-"))
        self.run = TrainingRun(self.work_dir / "runs")
        self.cache = ModelCache()

    def __repr__(self) -> str:
        return f"Board(work_dir='{self.work_dir}', run={self.run!r}, models={self.cache.held()})"

    def close(self) -> None:
        """Stop a running training (it saves a checkpoint) and let go of the models."""
        self.run.close()
        self.cache.clear()


@dataclass
class Labels:
    """Components whose text follows the language menu: ``label`` (label and hint) or ``value`` (buttons, Markdown)."""

    lang: str
    items: list[tuple[Any, str, str]]

    def __call__(self, component: Any, key: str, kind: str = "label") -> Any:
        self.items.append((component, key, kind))
        return component

    @property
    def components(self) -> list[Any]:
        return [c for c, _, _ in self.items]

    def updates(self, lang: str) -> list[Any]:
        """One ``gr.update`` per component, in :attr:`components` order, with ``lang``'s text."""
        import gradio as gr

        out = []
        for _, key, kind in self.items:
            if kind == "value":
                out.append(gr.update(value=text(key, lang)))
            else:
                change: dict[str, Any] = {"label": text(key, lang)}
                hint = info(key, lang)
                if hint:
                    change["info"] = hint
                out.append(gr.update(**change))
        return out

    def kw(self, key: str) -> dict[str, Any]:
        """``label=`` and ``info=`` keyword arguments for a new component."""
        hint = info(key, self.lang)
        return {"label": text(key, self.lang), **({"info": hint} if hint else {})}


@dataclass(frozen=True)
class ModelRow:
    """The model row above the tabs: model, template and adapter, which every tab reads."""

    model: Any
    template: Any
    adapter: Any
    lang: Any

    @property
    def inputs(self) -> list[Any]:
        return [self.model, self.template, self.adapter]


def choice_of(model: str, template: str | None, adapter: str | None) -> ModelChoice:
    return ModelChoice(model or "", adapter or "", template or "")


def shown_errors(lang: str, action: Callable[[], str]) -> str:
    """``action()``'s text, or its error as Markdown (logged with its traceback when unexpected)."""
    try:
        return action()
    except Exception as exc:  # the page shows every failure; nothing escapes into gradio's generic toast
        log_error(exc)
        return error_text(exc, lang)


def panel(lang: str, action: Callable[[], tuple[str, str]]) -> tuple[Any, str]:
    """For an output box and a notice line: ``action()``'s (text, note), the box shown; or its error as the notice."""
    import gradio as gr

    try:
        shown, note = action()
    except Exception as exc:
        log_error(exc)
        return gr.skip(), error_text(exc, lang)
    return gr.update(value=shown, visible=True), note


def streamed_errors(lang: str, stream: Callable[[], Iterator[Any]], wrap: Callable[[str], Any]) -> Iterator[Any]:
    """Yield ``stream()``'s items; an error ends it with ``wrap(error Markdown)``."""
    try:
        yield from stream()
    except Exception as exc:
        log_error(exc)
        yield wrap(error_text(exc, lang))


def log_error(exc: Exception) -> None:
    if isinstance(exc, (FinetuneKitError, OSError)):
        logger.warning("%s: %s", type(exc).__name__, exc)
    else:
        logger.exception("unexpected error in the board")
