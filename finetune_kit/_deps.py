"""Optional dependencies: import one, or raise :class:`MissingDependencyError` with the pip command."""

from __future__ import annotations

import importlib
from types import ModuleType

from finetune_kit.errors import MissingDependencyError

# module name -> (PyPI package, finetune_kit extra that installs it)
OPTIONAL: dict[str, tuple[str, str]] = {
    "fastapi": ("fastapi", "serve"),
    "uvicorn": ("uvicorn", "serve"),
    "sse_starlette": ("sse-starlette", "serve"),
    "rouge_chinese": ("rouge-chinese", "metrics"),
    "jieba": ("jieba", "metrics"),
    "nltk": ("nltk", "metrics"),
    "modelscope": ("modelscope", "modelscope"),
    "bitsandbytes": ("bitsandbytes", "qlora"),
    "deepspeed": ("deepspeed", "deepspeed"),
    "llama_cpp": ("llama-cpp-python", "gguf"),
}


def require(module: str, *, purpose: str) -> ModuleType:
    """Import ``module``; if it is missing, say which extra installs it.

    Example::

        uvicorn = require("uvicorn", purpose="Serving the API")
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package, extra = OPTIONAL.get(module.split(".")[0], (module, None))
        raise MissingDependencyError(package, purpose=purpose, extra=extra) from exc
