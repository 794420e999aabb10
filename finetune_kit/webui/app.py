"""The page (:func:`build_app`) and :func:`launch`: ``GRADIO_SERVER_NAME``, ``GRADIO_SERVER_PORT``, ``GRADIO_SHARE``."""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from finetune_kit.errors import ConfigError, MissingDependencyError
from finetune_kit.train.progress import in_notebook
from finetune_kit.webui import tasks, ui_chat, ui_eval, ui_train
from finetune_kit.webui.board import Board, Labels, ModelRow
from finetune_kit.webui.form import BUNDLED_MODEL
from finetune_kit.webui.texts import LANGS, text

logger = logging.getLogger("finetune_kit.webui")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
# the browser's language picks the page's unless launch() was given one
_BROWSER_LANG = "() => ((navigator.language || 'en').toLowerCase().startsWith('zh') ? 'zh' : 'en')"
_FONTS = (
    ["ui-sans-serif", "system-ui", "Segoe UI", "PingFang SC", "Microsoft YaHei", "sans-serif"],
    ["ui-monospace", "monospace"],
)


def build_app(board: Board | None = None, *, lang: str | None = None) -> Any:
    """The board as a ``gradio.Blocks`` (not launched): a model row over the Train, Evaluate, Export and Chat tabs.

    ``lang`` (``"en"`` or ``"zh"``) fixes the interface language; by default it follows the browser's.
    """
    import gradio as gr

    if lang is not None and lang not in LANGS:
        raise ConfigError(f"lang: got {lang!r}; expected one of {', '.join(LANGS)}")
    board = board if board is not None else Board()
    first = lang or "en"
    labels = Labels(first, [])
    with gr.Blocks(title="finetune_kit board", analytics_enabled=False) as demo:
        with gr.Row():
            labels(gr.Markdown(text("title", first)), "title", "value")
            lang_menu = gr.Dropdown(
                [("English", "en"), ("中文", "zh")], value=first, label="Language / 语言", scale=0, min_width=140
            )
        with gr.Row():
            model = labels(
                gr.Dropdown(
                    tasks.model_choices(),
                    value=BUNDLED_MODEL,
                    allow_custom_value=True,
                    scale=3,
                    elem_id="fk-model",
                    **labels.kw("model"),
                ),
                "model",
            )
            template = labels(
                gr.Dropdown(tasks.template_choices(), value="", allow_custom_value=True, **labels.kw("template")),
                "template",
            )
            adapter = labels(gr.Textbox(value="", scale=3, elem_id="fk-adapter", **labels.kw("adapter")), "adapter")
        row = ModelRow(model, template, adapter, lang_menu)
        with labels(gr.Tab(text("tab.train", first), elem_id="fk-tab-train"), "tab.train"):
            timer = ui_train.build(board, labels, row)
        with labels(gr.Tab(text("tab.eval", first), elem_id="fk-tab-eval"), "tab.eval"):
            ui_eval.build_evaluate(board, labels, row)
        with labels(gr.Tab(text("tab.export", first), elem_id="fk-tab-export"), "tab.export"):
            ui_eval.build_export(board, labels, row)
        with labels(gr.Tab(text("tab.chat", first), elem_id="fk-tab-chat"), "tab.chat"):
            ui_chat.build(board, labels, row)
        lang_menu.change(labels.updates, lang_menu, labels.components, queue=False)
        if lang is None:
            demo.load(None, None, lang_menu, js=_BROWSER_LANG)
        demo.load(lambda: gr.Timer(active=board.run.status().active), None, timer)
    demo.finetune_kit_board = board  # for tests and notebooks: the state behind the page
    demo.finetune_kit_labels = labels
    return demo


def theme() -> Any:
    """Gradio's default look with the system's fonts: no font service is asked (the board works offline)."""
    import gradio as gr

    return gr.themes.Default(font=_FONTS[0], font_mono=_FONTS[1])


@dataclass
class BoardServer:
    """A running board: its local URL, its share URL when one could be made, and :meth:`close`."""

    url: str
    share_url: str | None
    app: Any = field(repr=False)
    board: Board = field(repr=False)

    def close(self) -> None:
        """Stop the page's server, then a running training (it saves a checkpoint) and the held models."""
        self.app.close()
        self.board.close()


def launch(
    *,
    server_name: str | None = None,
    server_port: int | None = None,
    share: bool | None = None,
    lang: str | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    block: bool | None = None,
) -> BoardServer:
    """Start the board in the browser: ``finetune-kit webui`` from Python or Jupyter.

    ``server_name``, ``server_port`` and ``share`` default to ``GRADIO_SERVER_NAME`` (else
    127.0.0.1: set 0.0.0.0 to reach it from other machines), ``GRADIO_SERVER_PORT`` (else 7860)
    and ``GRADIO_SHARE``, as in LLaMA Board. Share links go through gradio.live and need internet
    access; when none can be made the board says so and stays on the local address. ``block``
    (default: yes outside Jupyter) keeps serving until Ctrl+C. Gradio's analytics are off. Example::

        from finetune_kit.webui import launch
        board = launch(server_port=7861, block=False)
        print(board.url)
        board.close()
    """
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no calls home
    if importlib.util.find_spec("gradio") is None:
        raise MissingDependencyError("gradio", purpose="The web board (finetune-kit webui)", extra="webui")
    host, port, wants_share = _settings(server_name, server_port, share)
    board = Board(os.fspath(work_dir) if work_dir is not None else None)
    demo = build_app(board, lang=lang)
    atexit.register(board.close)  # a run left going when the board's process ends gets its checkpoint and stops
    demo.queue(default_concurrency_limit=4)
    _, url, share_url = demo.launch(
        server_name=host, server_port=port, share=wants_share, prevent_thread_lock=True, quiet=True, theme=theme()
    )
    print(f"finetune_kit board: {url}", flush=True)
    if wants_share and not share_url:
        print(share_failed(host, port), file=sys.stderr, flush=True)
    elif share_url:
        print(f"Public share link: {share_url}", flush=True)
    server = BoardServer(url, share_url, demo, board)
    if block if block is not None else not in_notebook():
        try:
            demo.block_thread()
        finally:
            board.close()
    return server


def share_failed(host: str, port: int) -> str:
    """What to say when ``GRADIO_SHARE`` asked for a public link and gradio.live could not be reached."""
    reach = (
        f"http://<this machine's address>:{port}"
        if host in ("0.0.0.0", "::", "[::]")
        else f"set GRADIO_SERVER_NAME=0.0.0.0 and open http://<this machine's address>:{port}"
    )
    return (
        "finetune_kit board: GRADIO_SHARE is on, but no share link could be made: share links are tunnels "
        "through gradio.live and need internet access, which this machine does not have (or gradio.live did not "
        f"answer). The board runs locally at http://{host}:{port}. To reach it from another machine on your "
        f"network: {reach}; or forward the port over SSH (ssh -L {port}:localhost:{port} <this machine>)."
    )


def _settings(server_name: str | None, server_port: int | None, share: bool | None) -> tuple[str, int, bool]:
    problems = []
    host = server_name or os.environ.get("GRADIO_SERVER_NAME") or DEFAULT_HOST
    port = server_port
    if port is None:
        raw = os.environ.get("GRADIO_SERVER_PORT", "").strip()
        if raw and not raw.isdigit():
            problems.append(f"GRADIO_SERVER_PORT: got {raw!r}; expected a port number such as 7860")
        port = int(raw) if raw.isdigit() else DEFAULT_PORT
    if not 0 < port < 65536:
        problems.append(f"server port: got {port}; expected a number from 1 to 65535 (GRADIO_SERVER_PORT)")
    if share is None:
        raw = os.environ.get("GRADIO_SHARE", "").strip().lower()
        if raw not in ("", "0", "1", "true", "false", "yes", "no"):
            problems.append(f"GRADIO_SHARE: got {raw!r}; expected true or false")
        share = raw in ("1", "true", "yes")
    if problems:
        raise ConfigError(problems, header="Cannot start the board")
    return host, port, share
