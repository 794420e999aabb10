"""The board's page and its launch: English and Chinese text, GRADIO_* settings, offline share links, the CLI."""

from __future__ import annotations

import os
import re
import socket

import httpx
import pytest

from finetune_kit import ConfigError
from finetune_kit.cli.main import main
from finetune_kit.webui import app, build_app, launch
from finetune_kit.webui.board import Board
from finetune_kit.webui.texts import TEXTS, error_text, text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_text_has_english_and_chinese_with_the_same_placeholders():
    for key, (en, zh) in TEXTS.items():
        assert en.strip() and zh.strip(), key
        assert re.findall(r"{\w+}", en) == re.findall(r"{\w+}", zh), key
    assert text("tab.train", "zh") == "训练" and text("tab.train", "en") == "Train"


def test_errors_show_the_librarys_message_under_their_type():
    shown = error_text(ConfigError("lora_rank: got 0; expected a positive integer such as 8"), "zh")
    assert shown.startswith("**错误: ConfigError**") and "expected a positive integer such as 8" in shown
    assert error_text(RuntimeError("boom"), "en").startswith("**Unexpected error (the terminal has the traceback)")


def test_the_language_menu_relabels_every_registered_component(tmp_path):
    demo = build_app(Board(tmp_path), lang="zh")
    labels = [c.label for c in demo.blocks.values() if getattr(c, "label", None)]
    assert {"模型", "数据集", "学习率", "输出目录", "系统提示词"} <= set(labels)
    registered = demo.finetune_kit_labels
    english = registered.updates("en")
    assert len(english) == len(registered.components) > 60
    by_key = {key: update for (_, key, _), update in zip(registered.items, english, strict=True)}
    assert by_key["model"] == {"__type__": "update", "label": "Model", "info": text("model.info", "en")}
    assert by_key["start"]["value"] == "Start" and by_key["tab.chat"]["label"] == "Chat"
    assert registered.items[0][1] == "title" and registered.updates("zh")[0]["value"] == text("title", "zh")
    with pytest.raises(ConfigError, match="lang: got 'fr'"):
        build_app(Board(tmp_path), lang="fr")


def test_settings_come_from_gradios_environment_variables(monkeypatch):
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    monkeypatch.setenv("GRADIO_SHARE", "true")
    assert app._settings(None, None, None) == ("0.0.0.0", 7999, True)
    assert app._settings("127.0.0.1", 8000, False) == ("127.0.0.1", 8000, False)
    monkeypatch.setenv("GRADIO_SERVER_PORT", "http")
    monkeypatch.setenv("GRADIO_SHARE", "maybe")
    with pytest.raises(ConfigError) as err:
        app._settings(None, None, None)
    assert "GRADIO_SERVER_PORT: got 'http'" in str(err.value) and "GRADIO_SHARE: got 'maybe'" in str(err.value)


def test_a_share_link_that_cannot_connect_is_explained_and_the_board_stays_local(monkeypatch, capsys, tmp_path):
    import gradio.networking

    def offline(*args, **kwargs):
        raise RuntimeError("Could not get share link from Gradio API Server.")

    monkeypatch.setattr(gradio.networking, "setup_tunnel", offline)
    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)
    port = free_port()
    server = launch(server_port=port, share=True, block=False, work_dir=tmp_path, lang="en")
    try:
        assert server.share_url is None and server.url == f"http://127.0.0.1:{port}/"
        page = httpx.get(server.url, timeout=30)
        assert page.status_code == 200 and "finetune_kit board" in page.text
    finally:
        server.close()
    err = capsys.readouterr().err
    assert "GRADIO_SHARE is on, but no share link could be made" in err
    assert "need internet access" in err and f"http://127.0.0.1:{port}" in err
    assert "set GRADIO_SERVER_NAME=0.0.0.0" in err
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"


def test_the_webui_command_takes_no_keys(capsys):
    assert main(["webui", "--help"]) == 0
    assert "GRADIO_SERVER_PORT" in capsys.readouterr().out
    assert main(["webui", "port=7860"]) == 1
    assert "unknown key 'port'" in capsys.readouterr().err
