"""The chat page: browsers get it at ``/`` and ``/chat``, every other client keeps Ollama's root text,
and the page works end to end in headless Chromium against a real Server on 127.0.0.1.

The browser tests drive Debian's ``chromium`` through Playwright's driver (``pip install playwright``,
no ``playwright install``); without either they skip. The tiny Llama shows the page assembles the
streamed answer exactly and sends the conversation each turn; ``PacedEngine`` holds a reply
half-way, to show text rendering before the answer ends, the Stop button, and errors.
``FINETUNE_KIT_UPDATE_SCREENSHOTS=1`` also runs the bundled model to rewrite docs/images/webchat.png.
"""

from __future__ import annotations

import fnmatch
import os
import re
import threading
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

import httpx
import pytest

from finetune_kit.models.engine import Completion
from finetune_kit.models.generation import GenerationConfig
from finetune_kit.serve import ServeConfig, Server
from finetune_kit.serve.webchat import PAGE, page_html, prefers_html

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # the browser tests skip
    sync_playwright = None

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "images" / "webchat.png"
UPDATE_SCREENSHOTS = os.environ.get("FINETUNE_KIT_UPDATE_SCREENSHOTS") == "1"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
KEY = "sk-webchat"
LOCAL = dict(api_host="127.0.0.1", api_port=0, api_model_name=None, api_key=KEY)
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"


class PacedEngine:
    """Replies ``reply`` one word per piece; with ``hold`` set, waits for it after the first piece.

    ``seen`` records every conversation the server passed in, so a test reads what the page sent.
    """

    name, context_length, max_concurrency = "paced", 200, 1

    def __init__(self) -> None:
        self.reply, self.fail_after = "Hello there", None
        self.hold: threading.Event | None = None
        self.seen: list[list[dict[str, str]]] = []

    def render_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages)

    def encode_prompt(self, messages, system=None) -> list[int]:
        return [ord(c) for c in self.render_prompt(messages)]

    def stream(self, messages, generation=None, *, system=None, stop=()) -> Iterator[str | Completion]:
        self.seen.append([dict(m) for m in messages])
        words = self.reply.split(" ")
        pieces = [w if i == 0 else f" {w}" for i, w in enumerate(words)][: generation.max_new_tokens]
        for i, piece in enumerate(pieces):
            if i == self.fail_after:
                raise RuntimeError("the engine broke")
            if i == 1 and self.hold is not None:
                self.hold.wait(30)
            yield piece
        yield Completion("".join(pieces), len(self.encode_prompt(messages)), len(pieces), "stop")

    def generate(self, conversations, generation=None, *, batch_size=8, stop=()) -> list[Completion]:
        return [list(self.stream(c, generation))[-1] for c in conversations]


@pytest.fixture(scope="module")
def paced() -> PacedEngine:
    return PacedEngine()


@pytest.fixture(scope="module")
def paced_server(paced):
    with Server(paced, ServeConfig(**LOCAL)).start() as running:
        yield running


@pytest.fixture()
def engine(paced):
    paced.reply, paced.fail_after, paced.hold = "Hello there", None, None
    paced.seen.clear()
    yield paced
    if paced.hold is not None:
        paced.hold.set()  # never leave a generation waiting


# ----- without a browser -------------------------------------------------------------------------------
def test_root_serves_the_page_to_browsers_and_ollamas_text_to_everyone_else(paced_server):
    url = paced_server.url
    page = httpx.get(f"{url}/", headers={"Accept": BROWSER_ACCEPT})
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.text == page_html()
    assert "Accept" in page.headers["vary"].split(", ")  # caches keep the two answers of / apart
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    for accept in ("*/*", "application/json", "text/plain, text/html;q=0.5"):
        probe = httpx.get(f"{url}/", headers={"Accept": accept})
        assert (probe.status_code, probe.text) == (200, "Ollama is running"), accept
        assert probe.headers["content-type"].startswith("text/plain")
        assert "Accept" in probe.headers["vary"].split(", ")
    assert httpx.get(f"{url}/").text == "Ollama is running"  # httpx's default Accept, as Ollama clients send
    head = httpx.head(f"{url}/", headers={"Accept": BROWSER_ACCEPT})
    assert (head.status_code, head.headers["content-type"]) == (200, "text/plain; charset=utf-8")
    chat = httpx.get(f"{url}/chat")  # whatever the Accept header
    assert (chat.status_code, chat.text) == (200, page_html())
    # the page is open; the API it calls is not
    assert httpx.get(f"{url}/v1/models").status_code == 401


def test_the_page_is_self_contained_and_renders_model_text_as_text():
    html = page_html()
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", html, re.IGNORECASE), "no external references"
    assert set(re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html)) <= {"data:,"}
    assert '<meta charset="utf-8">' in html and 'name="viewport"' in html
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", html)


def test_the_page_ships_as_package_data():
    page = resources.files("finetune_kit.serve").joinpath(PAGE)
    assert page.is_file()
    assert page.read_text(encoding="utf-8") == page_html()
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch.fnmatch(f"serve/{PAGE}", pattern) for pattern in declared["finetune_kit"])


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        (BROWSER_ACCEPT, True),
        ("text/html", True),
        ("application/xhtml+xml, */*;q=0.1", True),
        ("TEXT/HTML; q=0.9, text/plain; q=0.9", True),
        ("*/*", False),
        (None, False),
        ("", False),
        ("application/json", False),
        ("text/*", False),
        ("text/html;q=0", False),
        ("text/plain, text/html;q=0.5", False),
        ("text/html;q=abc, */*", False),
    ],
)
def test_prefers_html_reads_the_accept_header(accept, html):
    assert prefers_html(accept) is html


# ----- in headless Chromium ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"needs Debian's chromium at {CHROMIUM} (apt-get install -y chromium)")
    if sync_playwright is None:
        pytest.skip("needs playwright's driver (pip install playwright; its own browsers are not used)")
    expect.set_options(timeout=30_000)  # a first generation on a loaded CPU can take a while
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


def open_page(
    browser: Browser, url: str, *, width: int = 1100, height: int = 760, scale: float = 1, key_saved: bool = False
) -> Page:
    """The page at ``url`` with the API key typed in (or, with ``key_saved``, kept from an earlier visit)."""
    context = browser.new_context(
        viewport={"width": width, "height": height},
        device_scale_factor=scale,
        permissions=["clipboard-read", "clipboard-write"],
    )
    context.set_default_timeout(30_000)
    if key_saved:
        context.add_init_script(f"localStorage.setItem('finetune_kit.chat.key', '{KEY}')")
    page = context.new_page()
    page.goto(url)
    if not key_saved:
        page.fill("#key", KEY)
    expect(page.locator("#model option")).not_to_have_count(0)
    expect(page.locator("#notice")).to_be_hidden()
    return page


def ask(page: Page, text: str) -> dict:
    """Send ``text`` with Enter; the JSON body of the request the page made."""
    with page.expect_request("**/v1/chat/completions") as sent:
        page.fill("#input", text)
        page.press("#input", "Enter")
    assert sent.value.header_value("authorization") == f"Bearer {KEY}"
    return sent.value.post_data_json


def test_chat_page_streams_the_models_answer_and_sends_the_conversation(browser, tiny_llama):
    gen = GenerationConfig(do_sample=False, max_new_tokens=16)
    with Server(tiny_llama, ServeConfig(**LOCAL), gen).start() as handle:
        page = browser.new_page()
        page.goto(f"{handle.url}/")  # Chromium's own Accept header gets the page, not "Ollama is running"
        expect(page.locator("#notice")).to_have_text("Could not list the models: Invalid API key.")
        page.close()

        page = open_page(browser, f"{handle.url}/")
        expect(page.locator("#model option")).to_have_text(["tiny-llama"])
        system = "You are the assistant of a small online shop."
        page.fill("#system", system)
        page.fill("#temperature", "0")
        expect(page.locator("#temperature-value")).to_have_text("0 (greedy)")
        page.fill("#max-tokens", "12")

        question = {"role": "user", "content": "Do you ship to Canada?"}
        body = ask(page, question["content"])
        assert body == {
            "model": "tiny-llama",
            "messages": [{"role": "system", "content": system}, question],
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0,
            "max_tokens": 12,
        }
        answers = page.locator(".turn.assistant")
        expect(answers.nth(0)).to_have_attribute("data-state", "done")
        expected = tiny_llama.generate([body["messages"]], gen.with_(max_new_tokens=12))[0]
        assert expected.text
        first = answers.nth(0).locator(".bubble").text_content()
        assert first == expected.text  # every streamed piece, in order, nothing dropped or doubled
        expect(answers.nth(0).locator(".status")).to_contain_text(f"{expected.completion_tokens} tokens")

        follow_up = {"role": "user", "content": "你们包邮吗？"}
        body = ask(page, follow_up["content"])
        assert body["messages"] == [
            {"role": "system", "content": system},
            question,
            {"role": "assistant", "content": first},
            follow_up,
        ]
        expect(answers.nth(1)).to_have_attribute("data-state", "done")
        expect(page.locator(".turn.user .bubble")).to_have_text([question["content"], follow_up["content"]])

        answers.nth(0).locator("button.copy").click()
        expect(answers.nth(0).locator("button.copy")).to_have_text("Copied")
        assert page.evaluate("navigator.clipboard.readText()") == first

        page.click("#new-chat")
        expect(page.locator("#log .turn")).to_have_count(0)
        body = ask(page, "Hello")
        assert body["messages"] == [{"role": "system", "content": system}, {"role": "user", "content": "Hello"}]
        expect(answers.nth(0)).to_have_attribute("data-state", "done")


def test_chat_page_shows_text_as_it_arrives_and_stops(browser, paced_server, engine):
    page = open_page(browser, f"{paced_server.url}/chat")
    engine.reply, engine.hold = "<b>Hi</b> <img src=x onerror=alert(1)> there", threading.Event()
    ask(page, "<i>hello</i>")
    answer = page.locator(".turn.assistant").nth(0)
    expect(answer.locator(".bubble")).to_have_text("<b>Hi</b>")  # the first piece, while the rest is held
    expect(answer).to_have_attribute("data-state", "streaming")
    expect(page.locator("#stop")).to_be_visible()
    expect(page.locator("#send")).to_be_hidden()
    assert page.locator(".bubble b, .bubble i, .bubble img").count() == 0  # markup stays text
    expect(page.locator(".turn.user .bubble")).to_have_text("<i>hello</i>")

    page.click("#stop")
    expect(answer).to_have_attribute("data-state", "stopped")
    expect(answer.locator(".status")).to_have_text("stopped")
    expect(page.locator("#send")).to_be_visible()
    engine.hold.set()  # let the abandoned generation end, freeing the server's one slot

    ask(page, "go on")
    expect(page.locator(".turn.assistant").nth(1)).to_have_attribute("data-state", "done")
    assert engine.seen[-1] == [  # the stopped answer, as far as it got, is part of the conversation
        {"role": "user", "content": "<i>hello</i>"},
        {"role": "assistant", "content": "<b>Hi</b>"},
        {"role": "user", "content": "go on"},
    ]


def test_chat_page_shows_the_servers_error_messages(browser, paced_server, engine):
    page = open_page(browser, f"{paced_server.url}/chat")
    engine.fail_after = 1
    ask(page, "break, please")
    failed = page.locator(".turn.assistant").nth(0)
    expect(failed).to_have_attribute("data-state", "error")
    expect(failed.locator(".error")).to_have_text("generation failed: RuntimeError: the engine broke")
    expect(page.locator("#input")).to_have_value("break, please")  # ready to send again

    engine.fail_after = None
    long = "x" * 300  # PacedEngine's context is 200 "tokens"
    ask(page, long)
    refused = page.locator(".turn.assistant").nth(1)
    expect(refused.locator(".error")).to_contain_text("This model's maximum context length is 200 tokens")

    body = ask(page, "hi")
    assert body["messages"] == [{"role": "user", "content": "hi"}]  # failed turns are not history
    expect(page.locator(".turn.assistant").nth(2)).to_have_attribute("data-state", "done")
    expect(page.locator(".turn.assistant .bubble").nth(2)).to_have_text("Hello there")


def test_chat_page_fits_a_phone_screen(browser, paced_server, engine):
    page = open_page(browser, f"{paced_server.url}/chat", width=360, height=740, key_saved=True)
    expect(page.locator("#settings")).not_to_have_attribute("open", "")  # settings fold away on narrow screens
    expect(page.locator("#key")).to_have_value(KEY)
    engine.reply = "Supercalifragilistic" * 15  # one word, wider than the screen
    ask(page, "Tell me something long")
    expect(page.locator(".turn.assistant")).to_have_attribute("data-state", "done")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360  # no sideways scrolling
    assert page.locator("#send").bounding_box()["x"] + page.locator("#send").bounding_box()["width"] <= 360


@pytest.mark.slow
@pytest.mark.skipif(not UPDATE_SCREENSHOTS, reason="set FINETUNE_KIT_UPDATE_SCREENSHOTS=1 to rewrite the screenshot")
def test_screenshot_for_the_docs(browser, bundled_model):
    gen = GenerationConfig(do_sample=False, max_new_tokens=64)
    with Server(bundled_model, ServeConfig(**LOCAL), gen).start() as handle:
        page = open_page(browser, f"{handle.url}/", width=1100, height=720, scale=2)
        page.fill("#system", "You are the friendly customer-service assistant of a small online shop.")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "64")
        for question in ("What payment methods do you accept?", "Great. Do you ship to Canada?"):
            ask(page, question)
            expect(page.locator(".turn.assistant").last).to_have_attribute("data-state", "done", timeout=60_000)
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))
