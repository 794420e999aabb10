"""Serve a model over an OpenAI-compatible HTTP API (LLaMA-Factory's ``api`` command).

``Server`` and ``ServeConfig`` are imported on first access; fastapi, uvicorn and
sse-starlette only when an app is built, so ``import finetune_kit`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finetune_kit.serve.config import ServeConfig
    from finetune_kit.serve.server import Server, ServerHandle

__all__ = ["ServeConfig", "Server", "ServerHandle"]


def __getattr__(name: str) -> Any:
    if name == "ServeConfig":
        from finetune_kit.serve.config import ServeConfig

        return ServeConfig
    if name in ("Server", "ServerHandle"):
        from finetune_kit.serve import server

        return getattr(server, name)
    raise AttributeError(f"module 'finetune_kit.serve' has no attribute {name!r}")
