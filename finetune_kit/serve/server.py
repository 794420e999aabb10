"""Server: serve a model over an OpenAI-compatible HTTP API (``llamafactory-cli api``).

fastapi, uvicorn and sse-starlette (the ``serve`` extra) are imported only when an app is built
or started, so importing this module stays cheap; when one is missing, that call raises
:class:`~finetune_kit.errors.MissingDependencyError` with the pip command, before any model loads.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from finetune_kit._deps import require
from finetune_kit.models.engine import Engine
from finetune_kit.models.generation import DEFAULT_GENERATION, GenerationConfig
from finetune_kit.models.loadable import Loadable, as_engine
from finetune_kit.serve.config import ServeConfig

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

LogLevel = Literal["critical", "error", "warning", "info", "debug"]
SERVING = "Serving the API"
T = TypeVar("T")


def _serve_extra() -> ModuleType:
    """uvicorn, once fastapi and sse-starlette are known to be importable too."""
    for module in ("fastapi", "sse_starlette"):
        require(module, purpose=SERVING)
    return require("uvicorn", purpose=SERVING)


class _Once(Generic[T]):
    """A value computed on first use, once, even from several threads."""

    def __init__(self, value: T | None = None) -> None:
        self._value = value
        self._lock = threading.Lock()

    def peek(self) -> T | None:
        """The value if it was computed already, else None (computes nothing)."""
        return self._value

    def get(self, make: Callable[[], T]) -> T:
        with self._lock:
            if self._value is None:
                self._value = make()
            return self._value


@dataclass(frozen=True, init=False, eq=False, repr=False)
class Server:
    """An OpenAI-compatible chat server over one model; immutable, ``with_*`` returns a new one.

    ``model`` is an :class:`~finetune_kit.models.engine.Engine` (a :class:`LoadedModel` or
    another backend) or anything with ``.load()`` (``ModelSource``, ``TrainResult``,
    ``ExportedModel``), loaded on first use and then shared by every ``with_*`` copy.
    ``config`` defaults to ``ServeConfig()`` (fields from ``API_HOST``, ``API_PORT``,
    ``API_KEY``, ...); ``generation`` holds the defaults of requests that leave temperature,
    top_p or max_tokens unset, greedy unless you pass one. Any ``model`` name in a request is
    accepted, as in LLaMA-Factory. Example::

        server = Server(ModelSource.bundled(), ServeConfig(api_port=8001))
        server.run()                              # blocks, like `llamafactory-cli api`

        with Server(model).with_config(api_host="127.0.0.1", api_port=0).start() as handle:
            client = openai.OpenAI(api_key="0", base_url=handle.base_url)
    """

    config: ServeConfig
    generation: GenerationConfig
    _source: object = field(repr=False)
    _engine: _Once[Engine] = field(repr=False)
    _app: _Once[FastAPI] = field(repr=False)

    def __init__(
        self, model: Engine | Loadable, config: ServeConfig | None = None, generation: GenerationConfig | None = None
    ) -> None:
        if config is not None and not isinstance(config, ServeConfig):
            raise TypeError(
                f"config must be a ServeConfig; got {type(config).__name__}. Fix: "
                "ServeConfig(api_port=8000) or server.with_config(api_port=8000)"
            )
        if generation is not None and not isinstance(generation, GenerationConfig):
            raise TypeError(
                f"generation must be a GenerationConfig; got {type(generation).__name__}. Fix: "
                "GenerationConfig(max_new_tokens=256) or server.with_generation(max_new_tokens=256)"
            )
        if isinstance(model, Loadable) and not isinstance(model, Engine):
            engine = _Once[Engine]()  # loaded on first use
        else:  # an Engine as it is; anything else raises as_engine's TypeError now
            engine = _Once[Engine](as_engine(model, who="Server"))
        self._fill(
            model,
            engine,
            config if config is not None else ServeConfig(),
            generation if generation is not None else DEFAULT_GENERATION,
        )

    def _fill(self, source: object, engine: _Once[Engine], config: ServeConfig, generation: GenerationConfig) -> None:
        for name, value in (
            ("config", config),
            ("generation", generation),
            ("_source", source),
            ("_engine", engine),
            ("_app", _Once[Any]()),
        ):
            object.__setattr__(self, name, value)

    def _copy(self, config: ServeConfig, generation: GenerationConfig) -> Server:
        """A Server with other settings over the same model, loaded or not (one load for all copies)."""
        copy = object.__new__(Server)
        copy._fill(self._source, self._engine, config, generation)
        return copy

    def with_config(self, **changes: Any) -> Server:
        """A new Server with :class:`ServeConfig` fields changed; a loaded model is shared."""
        return self._copy(self.config.with_(**changes), self.generation)

    def with_generation(self, **changes: Any) -> Server:
        """A new Server with default :class:`GenerationConfig` fields changed; a loaded model is shared."""
        return self._copy(self.config, self.generation.with_(**changes))

    @property
    def model(self) -> Engine:
        """The served engine, loaded on first access."""
        return self._engine.get(lambda: as_engine(self._source, who="Server"))

    @property
    def model_name(self) -> str:
        """The id that ``/v1/models`` lists and responses carry: ``api_model_name``, else the engine's name."""
        return self.config.served_name(self.model)

    @property
    def app(self) -> FastAPI:
        """The FastAPI app (built once); mount it in your own ASGI server if you like."""
        _serve_extra()  # before loading a model that could not be served
        from finetune_kit.serve.app import create_app  # fastapi and pydantic load with it

        return self._app.get(lambda: create_app(self.model, self.config, self.generation))

    def __repr__(self) -> str:
        engine = self._engine.peek()
        what = repr(engine.name) if engine is not None else f"{self._source!r} (not loaded)"
        auth = ", api_key=***" if self.config.api_key else ""
        return f"Server({what} at http://{self.config.api_host}:{self.config.api_port}/v1{auth})"

    def explain(self) -> str:
        """What will be served, where, and with which defaults, without loading anything."""
        cfg, gen, engine = self.config, self.generation, self._engine.peek()
        decoding = "greedy" if gen.greedy else f"sampling (temperature={gen.temperature}, top_p={gen.top_p})"
        name, limit = cfg.api_model_name or "the engine's name, once loaded", ""
        if engine is not None:
            name = cfg.served_name(engine)
            if engine.max_concurrency < cfg.max_concurrent:
                limit = f" (the engine runs at most {engine.max_concurrency})"
        return "\n".join(
            [
                repr(self),
                f"  model id: {name}",
                f"  auth: {'Bearer key required on /v1 and /api' if cfg.api_key else 'open (any key is accepted)'}",
                f"  concurrency: {cfg.max_concurrent} generating at once{limit}, up to {cfg.max_queued} more wait; "
                "beyond that 429 (/v1) or 503 (/api)",
                f"  defaults: {decoding}, max_new_tokens={gen.max_new_tokens}",
            ]
        )

    def run(self, *, log_level: LogLevel = "info") -> None:
        """Serve in the foreground until Ctrl+C, printing the base URL and a curl example first."""
        uvicorn = _serve_extra()
        logging_config = uvicorn.config.LOGGING_CONFIG
        app, name = self.app, self.model_name
        sock = _bind(self.config.api_host, self.config.api_port)
        url = _client_url(self.config.api_host, sock.getsockname()[1])
        log_config = {
            **logging_config,
            "loggers": {**logging_config["loggers"], "finetune_kit": {"handlers": ["default"], "level": "INFO"}},
        }
        adapters = tuple(getattr(self.model, "adapter_names", ()))
        also = f" (and its adapters {', '.join(repr(a) for a in adapters)})" if adapters else ""
        print(f"Serving {name!r}{also} with an OpenAI-compatible API at {url}/v1 and an Ollama-compatible one at {url}")
        print(_curl_example(url, name, bool(self.config.api_key)))
        config = uvicorn.Config(app, log_level=log_level, log_config=log_config)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C after a clean shutdown
            pass

    def start(self, *, timeout: float = 60.0, log_level: LogLevel = "warning") -> ServerHandle:
        """Serve from a background thread and return once the port accepts connections.

        Use the handle as a context manager, or call ``handle.stop()``. Port 0 picks a free port.
        """
        uvicorn = _serve_extra()
        app = self.app
        sock = _bind(self.config.api_host, self.config.api_port)
        config = uvicorn.Config(app, log_level=log_level, log_config=None, timeout_graceful_shutdown=3)
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [sock]},
            daemon=True,
            name=f"finetune_kit-server-{sock.getsockname()[1]}",
        )
        thread.start()
        handle = ServerHandle(server, thread, sock, self.model_name)
        deadline = time.monotonic() + timeout
        while not (server.started and _accepts(handle.host, handle.port)):
            if not thread.is_alive():
                sock.close()
                raise RuntimeError(f"the server thread exited during startup on {handle.url}; see the log above")
            if time.monotonic() > deadline:
                handle.stop()
                raise TimeoutError(f"the server on {handle.url} did not start within {timeout:.0f} s")
            time.sleep(0.02)
        return handle


class ServerHandle:
    """A server running in a background thread; ``stop()`` (or leaving ``with``) shuts it down."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, sock: socket.socket, model_name: str) -> None:
        self._server, self._thread, self._sock = server, thread, sock
        bound = sock.getsockname()
        self.host: str = _client_host(bound[0])
        self.port: int = bound[1]
        self.model_name = model_name

    @property
    def url(self) -> str:
        """The server root, e.g. ``http://127.0.0.1:8000``."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as ``base_url``, e.g. ``http://127.0.0.1:8000/v1``."""
        return f"{self.url}/v1"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit, wait up to ``timeout`` seconds, then force it. Safe to call twice."""
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ServerHandle({self.model_name!r} at {self.base_url}, {'running' if self.running else 'stopped'})"


def _bind(host: str, port: int) -> socket.socket:
    """Open the listening socket now, so a busy port fails here with a fix, not in a thread."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        fix = "stop whatever uses the port, or choose another with .with_config(api_port=...) (0 picks a free one)"
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}. Fix: {fix}") from exc
    return sock


def _client_host(host: str) -> str:
    """An address a local client can connect to (0.0.0.0 and :: listen everywhere, including loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _client_url(host: str, port: int) -> str:
    return f"http://{_client_host(host)}:{port}"


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=1):
            return True
    except OSError:
        return False


def _curl_example(url: str, name: str, auth: bool) -> str:
    key = ' -H "Authorization: Bearer $API_KEY"' if auth else ""
    body = f'{{"model": "{name}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
    return f"Try it:\n  curl {url}/v1/chat/completions -H \"Content-Type: application/json\"{key} \\\n    -d '{body}'"
