"""The board end to end in headless Chromium, on the bundled model and the demo data, without writing YAML:
pick the data, set a few steps, start, watch the loss plot update and the run finish, then chat with the result.

Drives Debian's ``chromium`` through Playwright's driver (no ``playwright install``); without either it skips.
Nothing the page loads may come from outside the board (it works offline). ``FINETUNE_KIT_UPDATE_SCREENSHOTS=1``
also rewrites docs/images/webui-*.png (adding a before/after prediction and the Chinese page).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_kit.models.generation import GenerationConfig
from finetune_kit.webui import BoardServer, launch
from finetune_kit.webui.form import BUNDLED_MODEL, DEMO_DATA
from finetune_kit.webui.models import ModelChoice

try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:  # the test skips
    sync_playwright = None

pytest.importorskip("gradio")
# gradio's queue computes its wait estimates with pandas idioms that pandas 3 deprecates
pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "docs" / "images"
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
QUESTION = "运费多少钱？"
STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def board(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BoardServer]:
    # a working folder in LLaMA-Factory's layout: data/dataset_info.json (the board's default dataset_dir)
    shutil.copytree(DEMO_DATA, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    server = launch(server_port=free_port(), block=False, work_dir="board", lang="en")
    yield server
    server.close()


@pytest.fixture()
def page(board: BoardServer) -> Iterator[Page]:
    if not CHROMIUM.exists():
        pytest.skip(f"needs Debian's chromium at {CHROMIUM} (apt-get install -y chromium)")
    if sync_playwright is None:
        pytest.skip("needs playwright's driver (pip install playwright; its own browsers are not used)")
    expect.set_options(timeout=60_000)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        outside: list[str] = []
        page.on(
            "request", lambda r: outside.append(r.url) if not r.url.startswith((board.url, "data:", "blob:")) else None
        )
        yield page
        browser.close()
    assert not outside, f"the page fetched from outside the board: {outside}"


def shoot(page: Page, name: str) -> None:
    if UPDATE_SCREENSHOTS:
        page.screenshot(path=str(IMAGES / name), full_page=True)


@pytest.mark.slow
def test_train_watch_and_chat_without_yaml(board: BoardServer, page: Page, tmp_path: Path) -> None:
    started = time.monotonic()
    page.goto(board.url)
    datasets = page.get_by_label("Datasets")
    datasets.click()
    datasets.fill("shop_alpaca")
    page.keyboard.press("Enter")
    expect(page.locator("#fk-tab-train")).to_contain_text("shop_alpaca")
    settings = {
        "Max steps": STEPS,
        "Cutoff length (tokens)": 64,
        "Batch size per device": 2,
        "Gradient accumulation": 1,
        "Max samples per dataset": 16,
        "Logging steps": 1,
        "Learning rate": 0.001,
    }
    for label, value in settings.items():
        page.get_by_label(label, exact=True).fill(str(value))
    expect(page.get_by_label("Data folder (dataset_dir)")).to_have_value("data")
    out = Path("saves", "shop")
    page.get_by_label("Output dir", exact=True).fill(str(out))

    page.click("#fk-start")
    status = page.locator("#fk-status")
    expect(status).to_contain_text(f"step 1/{STEPS}", timeout=150_000)
    plot = page.locator("#fk-loss img")
    expect(plot).to_be_visible()
    first_plot = plot.get_attribute("src")
    expect(status).to_contain_text("Finished.", timeout=150_000)
    expect(status).to_contain_text(f"step {STEPS}/{STEPS} (100%)")
    assert plot.get_attribute("src") != first_plot  # the plot was redrawn as steps came in
    expect(page.locator("#fk-adapter textarea, #fk-adapter input").first).to_have_value(str(out))
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_loss.png").is_file()
    trained = time.monotonic() - started
    page.evaluate("window.scrollTo(0, 0)")
    shoot(page, "webui-train.png")

    page.get_by_role("tab", name="Chat").click()
    page.click("#fk-load")
    expect(page.locator("#fk-model-info")).to_contain_text(f"adapters=['{out}']")
    page.locator("#fk-max-new input[type=number]").fill("48")
    page.locator("#fk-max-new input[type=number]").press("Enter")
    page.locator("#fk-message textarea").fill(QUESTION)
    page.click("#fk-send")
    tuned = board.board.cache.get(ModelChoice(BUNDLED_MODEL, str(out)))
    expected = tuned.chat(QUESTION, GenerationConfig(do_sample=False, max_new_tokens=48))
    bot = page.locator("#fk-chatbot .bot").last
    expect(bot).to_have_text(expected.strip())
    expect(page.locator("#fk-chatbot .user").last).to_have_text(QUESTION)
    shoot(page, "webui-chat.png")
    print(f"\nbrowser test: trained in {trained:.0f} s, whole test {time.monotonic() - started:.0f} s")

    if UPDATE_SCREENSHOTS:
        page.get_by_role("tab", name="Evaluate").click()
        page.get_by_label("Max new tokens", exact=True).fill("32")
        page.get_by_role("button", name="Predict and score").click()
        expect(page.locator("#fk-predict")).to_contain_text("delta", timeout=600_000)
        shoot(page, "webui-evaluate.png")
        page.get_by_label("Language / 语言").click()
        page.get_by_role("option", name="中文").click()
        page.get_by_role("tab", name="训练").click()
        expect(page.locator("#fk-start")).to_have_text("开始")
        page.evaluate("window.scrollTo(0, 0)")
        shoot(page, "webui-zh.png")
