"""``llavakit web --side-by-side`` in headless Chromium: the controller lists two models (the demo
model in float and in int8, each behind its own worker); one question, both panes answer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.serve.test_controller import spawn, wait_registered
from tests.serve.test_openai_e2e import SCENE, free_port, wait_healthy
from tests.serve.test_webui import ARTIFACTS, CHROMIUM, FLAGS

QUESTION = "How many shapes are there?"


@pytest.fixture(scope="module")
def web_url(tmp_path_factory):
    logs = tmp_path_factory.mktemp("web")
    cport = free_port()
    controller = f"http://127.0.0.1:{cport}"
    procs = [spawn(["controller", "--port", str(cport)], logs / "c.log")]
    try:
        wait_healthy(controller, procs[0])
        addresses = []
        for name, extra in (("demo", []), ("demo-int8", ["--quantize", "int8"])):
            port = free_port()
            args = ["worker", "--port", str(port), "--controller", controller, "--name", name]
            procs.append(spawn(args + extra, logs / f"{name}.log"))
            addresses.append(f"http://127.0.0.1:{port}")
            wait_healthy(addresses[-1], procs[-1])
        wait_registered(controller, addresses)
        wport = free_port()
        web = f"http://127.0.0.1:{wport}"
        args = ["web", "--controller", controller, "--port", str(wport), "--side-by-side"]
        procs.append(spawn(args, logs / "web.log"))
        wait_healthy(web, procs[-1], timeout=120, path="/")  # the Gradio page
        yield web + "/"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def test_two_models_answer_the_same_question_side_by_side(web_url):
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian chromium is missing: `make test` installs it")
    from playwright.sync_api import sync_playwright

    import llavakit

    expected = llavakit.load("demo").chat([SCENE], QUESTION, max_new_tokens=256).strip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(web_url, wait_until="networkidle")
        names = [page.locator(f"#llavakit-model-{i} input").input_value() for i in (0, 1)]
        assert sorted(names) == ["demo", "demo-int8"], names
        page.locator("#llavakit-image input[type=file]").set_input_files(str(SCENE))
        page.locator("#llavakit-image img").first.wait_for(timeout=30_000)
        page.locator("#llavakit-question textarea").fill(QUESTION)
        page.locator("#llavakit-send").click()
        page.wait_for_function(
            """() => [0, 1].every(i => {
                const bots = document.querySelectorAll(`#llavakit-chat-${i} [data-testid="bot"]`);
                return bots.length && bots[bots.length - 1].innerText.trim().length > 0;
            })""",
            timeout=90_000,
        )
        time.sleep(1.0)  # let both streams finish
        answers = {
            names[i]: page.locator(f'#llavakit-chat-{i} [data-testid="bot"]').last.inner_text()
            for i in (0, 1)
        }
        for i in (0, 1):
            user = page.locator(f'#llavakit-chat-{i} [data-testid="user"]').last.inner_text()
            assert user.strip() == QUESTION
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "web-side-by-side.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert answers["demo"].strip() == expected  # the float worker answers like llavakit.load()
    assert answers["demo-int8"].strip()  # the int8 worker answered too (its own answer)
    assert shot.stat().st_size > 10_000
