"""The page in a real browser: Debian's chromium driven by Playwright against `python app.py` on a free port.

One flow over the tiny-llama preset (trains in seconds): fill the wizard, watch the estimate and the
parameter chart follow the rank, preview data, start, watch the curve get points, reload and find the
run reattached, stop, chat side by side, use the calculator, export. Screenshots go to tests/screenshots/.
Run with `pytest -m browser tests/test_browser.py`.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "tests" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    assert Path(CHROMIUM).is_file(), "Debian chromium is missing: apt-get install -y chromium (.ci/run does)"
    ws = tmp_path_factory.mktemp("workspace")
    port = free_port()
    log = open(ws / "server.log", "w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--workspace", str(ws)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("app.py exited:\n" + (ws / "server.log").read_text())
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("app.py did not start in 120 s:\n" + (ws / "server.log").read_text())
    yield {"url": url, "workspace": ws, "log": ws / "server.log"}
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        pg = browser.new_page(viewport={"width": 1440, "height": 1000})
        pg.set_default_timeout(30000)
        pg.goto(server["url"])
        pg.wait_for_selector("#mem-plot .js-plotly-plot", timeout=60000)
        yield pg
        browser.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def set_number(page, selector: str, value) -> None:
    box = page.locator(selector)
    box.fill(str(value))
    box.press("Tab")


def pick(page, selector: str, text: str) -> None:
    """Choose an option of a Gradio dropdown: open its list and click the option whose label starts with text."""
    page.locator(selector).click()
    option = page.locator(f"li[data-testid='dropdown-option'][aria-label^='{text}']").first
    option.scroll_into_view_if_needed()
    option.click()


def wait_text_change(page, selector: str, before: str, timeout: float = 30) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        now = page.locator(selector).inner_text()
        # Gradio's progress overlay ("queue: 1/1", "0.1s") shows over the old content while it works
        pending = "queue:" in now or "processing" in now.lower() or re.match(r"\s*\d+(\.\d+)?s\b", now)
        if now != before and not pending:
            return now
        page.wait_for_timeout(250)
    raise AssertionError(f"{selector} did not change from {before[:200]!r}")


def test_wizard_estimate_follows_rank(page):
    pick(page, "#model-name input", "tiny-llama")
    page.wait_for_function("document.querySelector('#params-summary').innerText.includes('trainable of')")
    page.wait_for_function("!document.querySelector('#params-summary').innerText.includes('268')")
    params = page.locator("#params-summary").inner_text()
    layers = page.locator("#layer-plot").inner_text()
    memory = page.locator("#mem-plot").inner_text()
    set_number(page, "#tab-train .field-r input", 32)
    # 4 x (7168/8 x 32) at r=32; waits past Gradio's progress timer, which shows over the old text
    page.wait_for_function("document.querySelector('#params-summary').innerText.includes('28.67K trainable')")
    assert page.locator("#params-summary").inner_text() != params
    wait_text_change(page, "#layer-plot", layers)
    wait_text_change(page, "#mem-plot", memory)
    set_number(page, "#tab-train .field-max_length input", 64)
    set_number(page, "#tab-train .field-max_steps input", 3000)  # outlasts the reload and Stop of the next test
    set_number(page, "#tab-train .field-save_every input", 25)
    set_number(page, "#tab-train .field-lr input", 0.003)
    page.locator("#preview-btn").click()
    page.wait_for_function("document.querySelector('#data-summary').innerText.includes('examples')")
    assert page.locator("#data-examples span.tr").count() > 0  # trained tokens are highlighted
    shot(page, "01_wizard")


def test_train_reattach_stop(page, server):
    page.locator("#run-name input, #run-name textarea").first.fill("browser-run")
    page.locator("#start-btn").click()
    page.wait_for_selector("#live-run[data-run='browser-run'][data-state='running']", timeout=60000)
    page.wait_for_function(  # the curve has points: a train-loss trace with several x values
        "(() => { const d = document.querySelector('#loss-plot .js-plotly-plot');"
        " return d && d.data && d.data.length && d.data[0].x.length >= 3; })()", timeout=60000)
    shot(page, "02_training")
    page.reload()
    page.wait_for_selector("#live-run[data-run='browser-run']", timeout=60000)
    page.wait_for_function(
        "(() => { const d = document.querySelector('#loss-plot .js-plotly-plot');"
        " return d && d.data && d.data.length && d.data[0].x.length >= 3; })()", timeout=30000)
    state = page.locator("#live-run").get_attribute("data-state")
    assert state == "running", f"run not reattached as running after reload: {state}"
    page.wait_for_function("!document.querySelector('#stop-btn').disabled", timeout=15000)
    page.locator("#stop-btn").click()
    page.wait_for_selector("#live-run[data-state='stopped']", timeout=60000)
    assert (server["workspace"] / "runs" / "browser-run" / "checkpoints").is_dir()
    page.get_by_role("tab", name="Runs").click()
    page.wait_for_function("document.querySelector('#runs-table').innerText.includes('browser-run')")
    pick(page, "#runs-pick input", "browser-run")
    page.wait_for_function("document.querySelector('#run-detail').innerText.includes('checkpoints')")
    page.wait_for_selector("#run-curve .js-plotly-plot")
    shot(page, "03_runs")
    # re-run with changes: the run's settings go back into the wizard (r=32 from the rank test above)
    page.get_by_role("tab", name="Train").click()
    set_number(page, "#tab-train .field-r input", 8)
    page.get_by_role("tab", name="Runs").click()
    page.locator("#load-btn").click()
    page.wait_for_function("document.querySelector('#runs-msg').innerText.includes('Loaded the settings')")
    page.get_by_role("tab", name="Train").click()
    assert page.locator("#tab-train .field-r input").input_value() == "32"
    page.get_by_role("tab", name="Runs").click()


def test_chat_side_by_side_and_blind_ab(page, server):
    from playwright.sync_api import expect
    page.get_by_role("tab", name="Chat").click()
    page.wait_for_function("document.querySelector('#chat-run input').value.includes('browser-run')")
    page.locator("#tab-chat").get_by_text("Generation settings").click()
    set_number(page, "#tab-chat .field-max_new_tokens input", 24)
    page.locator("#chat-input textarea, #chat-input input").first.fill("Who are you?")
    page.locator("#chat-send").click()
    for side in ("#chat-left", "#chat-right"):
        page.wait_for_function(
            f"document.querySelectorAll('{side} .message-row').length >= 2", timeout=60000)
    page.wait_for_function("document.querySelector('#chat-status').innerText.includes('seed')")
    page.wait_for_timeout(1000)
    for side in ("#chat-left", "#chat-right"):
        assert page.locator(f"{side} .message-row").nth(1).inner_text().strip()
    shot(page, "04_chat")
    # blind A/B: sides hidden, a vote is saved as a preference pair and reveals them
    page.locator("#chat-mode").get_by_text("Blind A/B").click()
    expect(page.locator("#vote-a")).to_be_visible()
    page.locator("#chat-input textarea, #chat-input input").first.fill("Say hi")
    page.locator("#chat-send").click()
    expect(page.locator("#chat-status")).to_contain_text("Vote below", timeout=60000)
    page.locator("#vote-a").click()
    expect(page.locator("#vote-msg")).to_contain_text("Saved", timeout=15000)
    expect(page.locator("#chat-left")).to_contain_text("Model A =")
    assert (server["workspace"] / "preferences" / "browser-run.jsonl").is_file()
    shot(page, "04b_blind_ab")


def test_calculator(page):
    page.get_by_role("tab", name="Memory calculator").click()
    page.wait_for_selector("#calc-mem .js-plotly-plot", timeout=30000)
    from playwright.sync_api import expect
    pick(page, "#calc-model input", "qwen2.5-14b")
    try:  # Qwen2.5-14B's 16-bit weights alone (~27.5 GiB) are more than the default RTX 4090 holds
        expect(page.locator("#calc-verdict")).to_contain_text("Does not fit on RTX 4090", timeout=60000)
        expect(page.locator("#calc-verdict")).to_contain_text("Try")
        expect(page.locator("#calc-fit-table")).to_contain_text("H100 80GB", timeout=30000)
        expect(page.locator("#calc-answers")).to_contain_text("Largest batch size")
        expect(page.locator("#calc-answers")).to_contain_text("Fastest checkpointing that fits")
    finally:
        shot(page, "05_calculator")


def test_export(page, server):
    page.get_by_role("tab", name="Export").click()
    page.wait_for_function("document.querySelector('#export-run input').value.includes('browser-run')")
    page.locator("#export-adapter").click()
    page.wait_for_function("document.querySelector('#export-result').innerText.includes('saved to')", timeout=60000)
    out = server["workspace"] / "exports" / "browser-run-adapter"
    assert (out / "adapter_config.json").is_file()
    assert out.with_suffix(".zip").is_file()
    shot(page, "06_export")
    log = server["log"].read_text()
    assert "Traceback" not in log, log[-3000:]
