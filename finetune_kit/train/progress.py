"""What a user watches while training: one console progress bar, or a live loss plot in Jupyter.

transformers prints every log as a raw dict (``{'loss': '10.82', ...}``) through its
``ProgressCallback`` / ``PrinterCallback``; :func:`console_callbacks` swaps those for ours:

* console: one ``tqdm`` bar (steps, ETA; loss, lr, grad norm and tokens/s as its postfix), one
  readable line per evaluation and a summary line at the end; ``disable_tqdm`` prints one readable
  line per logging step instead of the bar;
* Jupyter: a loss figure and a status line updated in place (at most every ``interval`` seconds);
* always: ``trainer_log.jsonl`` (:class:`~finetune_kit.train.callbacks.JsonlLogCallback`).

This module stays light (no torch/transformers at import); the callback classes, which subclass
``transformers.TrainerCallback``, live in :mod:`finetune_kit.train.callbacks`, and the text they
show is built by :mod:`finetune_kit.train.metrics`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from finetune_kit.errors import ConfigError, MissingDependencyError, did_you_mean

# report_to name -> (pip package, modules of which one must be importable), as transformers' is_*_available
TRACKERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tensorboard": ("tensorboard", ("tensorboard", "tensorboardX")),
    "wandb": ("wandb", ("wandb",)),
    "mlflow": ("mlflow", ("mlflow",)),
    "comet_ml": ("comet-ml", ("comet_ml",)),
    "neptune": ("neptune", ("neptune",)),
    "clearml": ("clearml", ("clearml",)),
    "dagshub": ("dagshub", ("dagshub",)),
    "dvclive": ("dvclive", ("dvclive",)),
    "codecarbon": ("codecarbon", ("codecarbon",)),
    "swanlab": ("swanlab", ("swanlab",)),
    "trackio": ("trackio", ("trackio",)),
    "azure_ml": ("azureml-core", ("azureml",)),
    "flyte": ("flytekit", ("flytekit",)),
    "kubeflow": ("kubeflow-training", ("kubeflow",)),
}


def check_trackers(report_to: tuple[str, ...]) -> None:
    """Fail early, with the pip command, if a tracker named in ``report_to`` is unknown or not installed.

    Call before training: transformers otherwise fails inside ``Trainer.__init__`` with a traceback.

    >>> check_trackers(("none",))
    """
    names = [n for n in report_to if n not in ("none", "all")]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(
            [
                f"report_to: got {n!r}; expected none, all or {', '.join(TRACKERS)}.{did_you_mean(n, TRACKERS)}"
                for n in unknown
            ]
        )
    missing = [n for n in names if not any(_installed(m) for m in TRACKERS[n][1])]
    if missing:
        packages = " ".join(dict.fromkeys(TRACKERS[n][0] for n in missing))
        raise MissingDependencyError(packages, purpose=f"report_to: {', '.join(missing)}")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def in_notebook() -> bool:
    """Whether this process runs in a Jupyter kernel (ipykernel), where rich displays update in place."""
    ipython = sys.modules.get("IPython")  # a kernel has imported it already; never import it here
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython is not None else None
    if shell is None:
        return False
    return type(shell).__name__ == "ZMQInteractiveShell" or "IPKernelApp" in getattr(shell, "config", {})


def console_callbacks(
    out: Path, *, disable_tqdm: bool = False, notebook: bool | None = None
) -> tuple[list[Any], list[type]]:
    """Callbacks to add to the trainer, and transformers' own display callbacks to remove.

    ``notebook`` defaults to :func:`in_notebook`; in a notebook with ``disable_tqdm`` the plain
    lines are printed instead of the live plot.

    >>> add, remove = console_callbacks(Path("out"))  # doctest: +SKIP
    >>> trainer = Trainer(..., callbacks=add)  # doctest: +SKIP
    >>> for cls in remove: trainer.remove_callback(cls)  # doctest: +SKIP
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from finetune_kit.train.callbacks import ConsoleProgressCallback, JsonlLogCallback, LivePlotCallback

    remove: list[type] = [ProgressCallback, PrinterCallback]
    if "IPython" in sys.modules or "marimo" in sys.modules:  # transformers picks its notebook bar only then
        try:
            from transformers.utils.notebook import NotebookProgressCallback  # imports IPython.display
        except ImportError:
            pass
        else:
            remove.append(NotebookProgressCallback)
    if notebook is None:
        notebook = in_notebook()
    display: Any = (
        LivePlotCallback() if notebook and not disable_tqdm else ConsoleProgressCallback(bar=not disable_tqdm)
    )
    return [JsonlLogCallback(out), display], remove
