"""How to serve: LLaMA-Factory's API settings (``API_HOST``, ``API_PORT``, ``API_KEY``, ...)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune_kit.config.base import StageConfig

if TYPE_CHECKING:
    from finetune_kit.models.engine import Engine


def _env_option(env: str, fallback: Any, help: str) -> Any:
    """A field whose default is read from ``env`` when a config is built (not at import)."""
    factory: Callable[[], Any] = lambda: os.environ.get(env, fallback)  # noqa: E731
    return dataclasses.field(default_factory=factory, metadata={"help": f"{help} (env {env})", "env": env})


@dataclass(frozen=True, repr=False)
class ServeConfig(StageConfig):
    """Where and how the OpenAI-compatible server listens.

    One rule: a field you pass wins; a field you leave out is read from its LLaMA-Factory
    environment variable (``API_HOST``, ``API_PORT``, ``API_KEY``, ``API_MODEL_NAME``,
    ``MAX_CONCURRENT``, ``MAX_QUEUED``, ``MAX_REQUEST_BYTES``, ``MAX_TOKENS_LIMIT``, ``API_VERBOSE``)
    when the config is constructed, else takes its
    default. So ``API_PORT=8001 python app.py`` works as with ``llamafactory-cli api``, and
    ``API_KEY`` keeps protecting a server whose config sets only the port. ``with_()`` copies
    the values already read and never reads the environment again. Example::

        config = ServeConfig(api_host="127.0.0.1", api_port=8001)   # API_KEY etc. from the environment
        local = config.with_(api_port=0)                            # same key, a free port
    """

    section = "api"

    api_host: str = _env_option("API_HOST", "0.0.0.0", "Interface to listen on; 0.0.0.0 means every interface.")
    api_port: int = _env_option("API_PORT", 8000, "TCP port; 0 picks a free one.")
    api_key: str | None = _env_option(
        "API_KEY", None, "When set, every /v1 and /api route needs 'Authorization: Bearer <key>'."
    )
    api_model_name: str | None = _env_option(
        "API_MODEL_NAME", None, "Model id shown by /v1/models; none derives it from the model or adapter folder."
    )
    max_concurrent: int = _env_option(
        "MAX_CONCURRENT", 32, "Requests decoding together in one batch; the rest wait in the queue."
    )
    max_queued: int = _env_option(
        "MAX_QUEUED", 256, "Requests that may wait for a place; beyond them a request gets 429 (/v1) or 503 (/api)."
    )
    max_request_bytes: int = _env_option(
        "MAX_REQUEST_BYTES", 4 * 1024 * 1024, "Largest request body accepted; a larger one gets 413."
    )
    max_tokens_limit: int | None = _env_option(
        "MAX_TOKENS_LIMIT", None, "Most tokens one reply may ask for (max_tokens, num_predict); none: the context."
    )
    api_verbose: bool = _env_option("API_VERBOSE", True, "Log one line per request.")

    def _check(self) -> list[str]:
        problems = []
        if not 0 <= self.api_port <= 65535:
            problems.append(f"api_port: got {self.api_port}; expected 0..65535 (0 picks a free port)")
        if self.max_concurrent < 1:
            problems.append(f"max_concurrent: got {self.max_concurrent}; expected at least 1")
        if self.max_queued < 0:
            problems.append(f"max_queued: got {self.max_queued}; expected 0 or more")
        if self.max_request_bytes < 1024:
            problems.append(f"max_request_bytes: got {self.max_request_bytes}; expected at least 1024")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            problems.append(f"max_tokens_limit: got {self.max_tokens_limit}; expected at least 1 (or none)")
        if not self.api_host.strip():
            problems.append("api_host: got an empty string; expected an address such as 127.0.0.1 or 0.0.0.0")
        if self.api_model_name is not None and not self.api_model_name.strip():
            problems.append("api_model_name: got an empty string; leave it unset to derive a name")
        return problems

    def served_name(self, engine: Engine) -> str:
        """The model id the API reports: ``api_model_name``, else the engine's own short name (for a
        LoadedModel, the last adapter folder's name, else the model path's last part)."""
        return self.api_model_name or engine.name

    def __repr__(self) -> str:
        parts = [f"{self.api_host}:{self.api_port}"]
        if self.api_model_name:
            parts.append(f"api_model_name={self.api_model_name!r}")
        parts.append("api_key=***" if self.api_key else "api_key=None")
        parts.append(f"max_concurrent={self.max_concurrent}")
        return f"ServeConfig({', '.join(parts)})"
