"""The one exception tree of finetune_kit.

Every error subclasses :class:`FinetuneKitError` *and* the builtin it refines, so
``except ValueError`` or ``except FileNotFoundError`` in user code keeps working.
Messages say what was wrong, the value received, and how to fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FinetuneKitError(Exception):
    """Base class of every error raised by finetune_kit."""


class ConfigError(FinetuneKitError, ValueError):
    """A configuration value (Python argument, YAML key or CLI flag) is invalid.

    Holds *all* the problems found at once in :attr:`problems`.
    """

    def __init__(self, problems: str | Iterable[str], *, header: str = "Invalid configuration") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = f"{header}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{header} ({len(self.problems)} problems):\n{lines}"
        super().__init__(message)


class UnknownKeysError(ConfigError):
    """Keys that finetune_kit does not know, or knows but does not support yet."""


class EnvironmentCheckError(FinetuneKitError, RuntimeError):
    """The machine lacks something the requested run needs (a GPU, bf16, a package)."""


class MissingDependencyError(EnvironmentCheckError, ImportError):
    """An optional package is not installed; the message names the pip command."""

    def __init__(self, package: str, *, purpose: str, extra: str | None = None) -> None:
        fix = f'pip install "finetune-kit[{extra}]"' if extra else f"pip install {package}"
        super().__init__(f"{purpose} needs the package '{package}', which is not installed. Fix: {fix}")
        self.package = package


class ModelNotFoundError(FinetuneKitError, FileNotFoundError):
    """A model id or path could not be resolved locally or from its hub."""


class DatasetError(FinetuneKitError, ValueError):
    """A dataset file, its dataset_info.json entry, or one of its rows is malformed."""


class DatasetRowError(DatasetError):
    """One row of a dataset file is malformed.

    Carries the file, the 0-based row index and the field so tools can point at it.
    """

    def __init__(self, *, file: str, row: int, field: str, problem: str, fix: str) -> None:
        self.file, self.row, self.field = file, row, field
        super().__init__(f"{file}, row {row}, field '{field}': {problem}. Fix: {fix}")


class DatasetRowsError(DatasetRowError):
    """Some rows of the selected datasets are malformed: all of them, in one error.

    ``rows`` holds every :class:`DatasetRowError`; the message shows the first ``shown`` and the
    total. ``file``, ``row`` and ``field`` are the first bad row's, so code that handles a single
    :class:`DatasetRowError` keeps working.
    """

    def __init__(self, rows: Iterable[DatasetRowError], *, shown: int = 20) -> None:
        self.rows = tuple(rows)
        self.file, self.row, self.field = self.rows[0].file, self.rows[0].row, self.rows[0].field
        lines = [f"  - {exc}" for exc in self.rows[:shown]]
        more = len(self.rows) - len(lines)
        if more > 0:
            lines.append(f"  ... and {more} more (finetune-kit data check lists them all)")
        files = sorted({exc.file for exc in self.rows})
        DatasetError.__init__(
            self,
            f"{len(self.rows)} bad row{'s' if len(self.rows) != 1 else ''} in {', '.join(files)}:\n"
            + "\n".join(lines)
            + "\nFix these rows, or set skip_invalid: true to train without them (their count and places are printed).",
        )


class TrainingError(FinetuneKitError, RuntimeError):
    """Training stopped: a non-finite loss, an error of the training stack, out of memory, ...

    The message says at which step, what the last usable checkpoint is, and what to change.
    """


class TrainingInterrupted(TrainingError):
    """SIGTERM/SIGINT stopped training after saving a checkpoint; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, *, signum: int, checkpoint: str | None) -> None:
        super().__init__(message)
        self.signum, self.checkpoint, self.exit_code = signum, checkpoint, 128 + signum


class ExportError(FinetuneKitError, RuntimeError):
    """Writing an export failed (llama.cpp's converter or quantizer, ``ollama create``); the message says why and
    what to do. Nothing half-written is left behind."""


class OutputExistsError(FinetuneKitError, FileExistsError):
    """Refusing to overwrite something the user already has."""


class TemplateError(FinetuneKitError, ValueError):
    """A chat template is unknown or cannot encode the given conversation."""


class RequestError(FinetuneKitError, ValueError):
    """An HTTP request the server cannot serve; sent as an OpenAI-shaped error body with ``status``."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        status: int = 400,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type

    def body(self) -> dict[str, dict[str, str | None]]:
        """``{"error": {"message", "type", "param", "code"}}``, as the OpenAI API answers."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class FinetuneKitWarning(UserWarning):
    """Warnings emitted by finetune_kit (the test-suite turns them into errors)."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return a ``" Did you mean 'x'?"`` suffix for the closest choice, or ``""``."""
    close = difflib.get_close_matches(value, list(choices), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""
