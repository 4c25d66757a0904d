"""The page ``dynalora serve`` serves at ``/``, in headless Chromium (Playwright driving Debian's ``chromium``, or
Playwright's own browser where it is installed): it loads the models, streams a reply token by token coloured by the
blend, and shows the shift events on the list and the timeline."""

from __future__ import annotations

import shutil

import pytest

from dynalora.models import tiny_model
from dynalora.serve.app import create_app
from dynalora.serve.config import ServeConfig
from dynalora.system.assemble import System
from dynalora.system.spec import EngineSpec
from test_engine import random_bank
from test_serve import running

sync_api = pytest.importorskip("playwright.sync_api", reason="the page test needs playwright (pip install playwright)")
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=BROWSER, headless=True, args=["--no-sandbox"])
        except Exception as error:  # noqa: BLE001 - no browser on this machine: say so, do not fail
            pytest.skip(f"no Chromium to drive (apt-get install chromium): {error}")
        yield launched
        launched.close()


def test_the_page_streams_a_reply_coloured_by_the_blend_and_shows_its_shifts(tmp_path, browser):
    random_bank(tiny_model("llama")).save(tmp_path / "bank")
    engine = System.from_checkpoints(EngineSpec(model="tiny:llama", bank=tmp_path / "bank", triggers=["every:4"],
                                                min_gap=4)).engine()
    app = create_app(engine, ServeConfig(max_tokens=128, sessions_dir=tmp_path / "s"), "tiny")
    with running(app) as port:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("body[data-ready=true]")
        assert page.locator("#model option").all_text_contents() == ["tiny", "adapter0", "adapter1", "adapter2"]
        page.select_option("#model", "adapter1")
        page.fill("#prompt", "Tell me something.")
        page.click("#send")
        page.wait_for_selector(".message.assistant[data-done=true]", timeout=60_000)
        tokens = page.locator(".message.assistant .token")
        assert tokens.count() > 8
        assert tokens.first.evaluate("span => getComputedStyle(span).backgroundColor") != "rgba(0, 0, 0, 0)"
        assert tokens.first.get_attribute("title") == "adapter1 1.00"  # the requested blend, until the first shift
        shifts = page.locator("#events li.shift")
        assert shifts.count() >= 2 and "→" in shifts.first.text_content()
        assert page.locator("#timeline .step").count() == tokens.count() + page.locator("#events li").count()
        assert page.locator("#timeline .step.event").count() == page.locator("#events li").count()
        colours = {tokens.nth(i).evaluate("span => span.style.background") for i in range(tokens.count())}
        assert len(colours) > 1  # the shifts changed the colour of the tokens after them
