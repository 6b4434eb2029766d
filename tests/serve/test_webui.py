"""The web UI on ``llavakit serve``, in real headless Chromium (Debian's) driven by Playwright:
upload an image, ask, watch the answer stream in; a screenshot is saved."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.serve.test_openai_e2e import ROOT, SCENE, free_port, wait_healthy

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("LLAVAKIT_ARTIFACTS", ROOT / "work" / "artifacts"))


@pytest.fixture(scope="module")
def ui_url(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("ui") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llavakit", "serve", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ | {"HF_HUB_OFFLINE": "1"},
            cwd=ROOT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url + "/ui/"
    finally:
        proc.terminate()
        proc.wait(30)


def test_upload_ask_and_see_the_streamed_answer(ui_url):
    if not Path(CHROMIUM).exists():
        pytest.fail(
            "Debian chromium is missing: `make test` installs it (apt-get install chromium)"
        )
    from playwright.sync_api import sync_playwright

    import llavakit

    pipe = llavakit.load("demo")
    expected = pipe.chat([SCENE], "How many shapes are there?", max_new_tokens=256).strip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(ui_url, wait_until="networkidle")
        page.locator("#llavakit-image input[type=file]").set_input_files(str(SCENE))
        page.locator("#llavakit-image img").first.wait_for(timeout=30_000)
        question = page.locator("#llavakit-question textarea")
        question.fill("How many shapes are there?")
        page.locator("#llavakit-send").click()
        bots = page.locator('#llavakit-chat-0 [data-testid="bot"]')
        page.wait_for_function(
            """([want]) => {
                const bots = document.querySelectorAll('#llavakit-chat-0 [data-testid="bot"]');
                return bots.length && bots[bots.length - 1].innerText.trim() === want;
            }""",
            arg=[expected],
            timeout=60_000,
        )
        user_text = page.locator('#llavakit-chat-0 [data-testid="user"]').last.inner_text()
        assert user_text.strip() == "How many shapes are there?"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "webui-image.png"), full_page=True)
        # a long answer (a fresh page, text only: the demo model's picture answers are one word),
        # sampled while it arrives: the bubble grows in several steps
        page.goto(ui_url, wait_until="networkidle")
        question = page.locator("#llavakit-question textarea")
        question.fill("Write a short story about a cat.")
        page.locator("#llavakit-send").click()
        bots = page.locator('#llavakit-chat-0 [data-testid="bot"]')
        bots.first.wait_for(timeout=60_000)
        seen, stable, deadline = [], 0, time.monotonic() + 120
        while time.monotonic() < deadline and stable < 40:
            text = bots.last.inner_text().strip()
            if text and (not seen or text != seen[-1]):
                seen.append(text)
                stable = 0
            else:
                stable += 1
            time.sleep(0.05)
        shot = ARTIFACTS / "webui.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert len(seen) >= 3, seen  # several partial answers: it streamed
    assert all(seen[-1].startswith(part) for part in seen[:-1])
    assert shot.stat().st_size > 10_000
