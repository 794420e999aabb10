"""Serve a model over an OpenAI-compatible HTTP API (LLaMA-Factory's ``api`` command).

Importing this package stays cheap: fastapi, uvicorn and sse-starlette (the ``serve`` extra)
load only when a :class:`Server` builds or starts its app.
"""

from __future__ import annotations

from finetune_kit.serve.config import ServeConfig
from finetune_kit.serve.server import Server, ServerHandle

__all__ = ["ServeConfig", "Server", "ServerHandle"]
