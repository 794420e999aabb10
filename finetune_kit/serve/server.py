"""Server: serve a model over an OpenAI-compatible HTTP API (``llamafactory-cli api``).

fastapi, uvicorn and sse-starlette are imported only when an app is built or started, so
importing this module stays cheap.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Literal, Protocol

from finetune_kit.models.generation import GenerationConfig
from finetune_kit.serve.config import ServeConfig

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from finetune_kit.models.loaded import LoadedModel

LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class Loadable(Protocol):
    """Anything that can give a :class:`LoadedModel`: a ModelSource, and later stages' results."""

    def load(self) -> LoadedModel: ...


class Server:
    """An OpenAI-compatible chat server over one model; immutable, ``with_*`` returns a new one.

    ``model`` is a :class:`LoadedModel` or anything with ``.load()`` returning one (loaded on
    first use). Any ``model`` name in a request is accepted, as in LLaMA-Factory. Example::

        server = Server(ModelSource.bundled(), ServeConfig(api_port=8001))
        server.run()                              # blocks, like `llamafactory-cli api`

        with Server(model).with_config(api_host="127.0.0.1", api_port=0).start() as handle:
            client = openai.OpenAI(api_key="0", base_url=handle.base_url)
    """

    __slots__ = ("_app", "_config", "_generation", "_lock", "_model", "_source")

    def __init__(self, model: LoadedModel | Loadable, config: ServeConfig | None = None,
                 generation: GenerationConfig | None = None) -> None:
        from finetune_kit.models.loaded import LoadedModel

        if not isinstance(model, LoadedModel) and not callable(getattr(model, "load", None)):
            raise TypeError(f"Server needs a LoadedModel or an object with .load() (ModelSource, TrainResult, "
                            f"ExportedModel); got {type(model).__name__}. Fix: Server(ModelSource.bundled().load())")
        if config is not None and not isinstance(config, ServeConfig):
            raise TypeError(f"config must be a ServeConfig; got {type(config).__name__}. Fix: "
                            "ServeConfig(api_port=8000) or server.with_config(api_port=8000)")
        if generation is not None and not isinstance(generation, GenerationConfig):
            raise TypeError(f"generation must be a GenerationConfig; got {type(generation).__name__}")
        self._model: LoadedModel | None = model if isinstance(model, LoadedModel) else None
        self._source: Any = model
        self._config = config if config is not None else ServeConfig()
        self._generation = generation if generation is not None else GenerationConfig()
        self._app: FastAPI | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ fluent, read-only
    @property
    def config(self) -> ServeConfig:
        return self._config

    @property
    def generation(self) -> GenerationConfig:
        """Defaults for requests that leave temperature, top_p or max_tokens unset."""
        return self._generation

    def with_config(self, **changes: Any) -> Server:
        """A new Server with :class:`ServeConfig` fields changed; a loaded model is shared."""
        return Server(self._model or self._source, self._config.with_(**changes), self._generation)

    def with_generation(self, **changes: Any) -> Server:
        """A new Server with default :class:`GenerationConfig` fields changed."""
        return Server(self._model or self._source, self._config, self._generation.with_(**changes))

    @property
    def model(self) -> LoadedModel:
        """The served model, loaded on first access."""
        with self._lock:
            if self._model is None:
                from finetune_kit.models.loaded import LoadedModel

                loaded = self._source.load()
                if not isinstance(loaded, LoadedModel):
                    raise TypeError(f"{type(self._source).__name__}.load() returned {type(loaded).__name__}, "
                                    "not a LoadedModel")
                self._model = loaded
            return self._model

    @property
    def model_name(self) -> str:
        """The id that ``/v1/models`` lists and responses carry."""
        from finetune_kit.serve.app import served_name

        return served_name(self.model, self._config)

    @property
    def app(self) -> FastAPI:
        """The FastAPI app (built once); mount it in your own ASGI server if you like."""
        if self._app is None:
            from finetune_kit.serve.app import create_app

            app = create_app(self.model, self._config, self._generation)
            with self._lock:
                self._app = self._app or app
        return self._app

    def __repr__(self) -> str:
        what = self._model.source.display_name if self._model is not None else f"{self._source!r} (not loaded)"
        auth = ", api_key=***" if self._config.api_key else ""
        return f"Server({what} at http://{self._config.api_host}:{self._config.api_port}/v1{auth})"

    def explain(self) -> str:
        """What will be served, where, and with which defaults, without loading anything."""
        cfg, gen = self._config, self._generation
        decoding = "greedy" if gen.greedy else f"sampling (temperature={gen.temperature}, top_p={gen.top_p})"
        return "\n".join([
            repr(self),
            f"  model id: {cfg.api_model_name or 'derived from the model or adapter folder'}",
            f"  auth: {'Bearer key required on /v1' if cfg.api_key else 'open (any key is accepted)'}",
            f"  concurrency: {cfg.max_concurrent} generating at once, the rest wait",
            f"  defaults: {decoding}, max_new_tokens={gen.max_new_tokens}",
        ])

    # ------------------------------------------------------------------ running
    def run(self, *, log_level: LogLevel = "info") -> None:
        """Serve in the foreground until Ctrl+C, printing the base URL and a curl example first."""
        import uvicorn
        from uvicorn.config import LOGGING_CONFIG

        app, name = self.app, self.model_name
        sock = _bind(self._config.api_host, self._config.api_port)
        url = _client_url(self._config.api_host, sock.getsockname()[1])
        log_config = {**LOGGING_CONFIG, "loggers": {**LOGGING_CONFIG["loggers"],
                                                    "finetune_kit": {"handlers": ["default"], "level": "INFO"}}}
        print(f"Serving {name!r} with an OpenAI-compatible API at {url}/v1")
        print(_curl_example(url, name, bool(self._config.api_key)))
        config = uvicorn.Config(app, log_level=log_level, log_config=log_config)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C after a clean shutdown
            pass

    def start(self, *, timeout: float = 60.0, log_level: LogLevel = "warning") -> ServerHandle:
        """Serve from a background thread and return once the port accepts connections.

        Use the handle as a context manager, or call ``handle.stop()``. Port 0 picks a free port.
        """
        import uvicorn

        app = self.app
        sock = _bind(self._config.api_host, self._config.api_port)
        config = uvicorn.Config(app, log_level=log_level, log_config=None, timeout_graceful_shutdown=3)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                                  name=f"finetune_kit-server-{sock.getsockname()[1]}")
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

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, sock: socket.socket,
                 model_name: str) -> None:
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
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}. Fix: stop whatever uses the "
                                 "port, or choose another with .with_config(api_port=...) (0 picks a free one)") from exc
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
    return (f"Try it:\n  curl {url}/v1/chat/completions -H \"Content-Type: application/json\"{key} \\\n"
            f"    -d '{body}'")
