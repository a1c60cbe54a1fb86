"""The Train tab in a real browser: start a LoRA run on tiny, watch the loss plot and previews update, stop it,
resume it, see it finish; the LoRA appears in the workspace's models/lora."""
from __future__ import annotations

import re

import pytest

from conftest import ROOT, screenshot
from train_helpers import make_kohya_dataset

pytestmark = pytest.mark.browser


def _set(page, elem_id, value):
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(str(value))
    box.press("Tab")


def _step(page) -> int:
    m = re.search(r"step (\d+)/", page.locator("#train-progress").inner_text())
    return int(m[1]) if m else 0


def test_train_tab_start_watch_stop_resume_finish(app_server, page):
    from playwright.sync_api import expect

    make_kohya_dataset(app_server.home / "datasets" / "faces", n=3, repeats=2)
    page.goto(app_server.url, wait_until="domcontentloaded")
    page.get_by_role("tab", name="Train").click()
    _set(page, "train-dataset", "datasets/faces")
    _set(page, "train-output-name", "browser-lora")
    for key, value in {"resolution": 64, "max-steps": 20, "sample-every": 6, "save-every": 0}.items():
        _set(page, f"train-{key}", value)
    page.locator("#train-advanced").get_by_text("Advanced").first.click()
    _set(page, "train-sample-steps", 1)
    page.locator("#train-advanced").get_by_text("Advanced").first.click()  # fold it again for the screenshot
    page.click("#train-start")

    # The loss plot and the previews fill while it trains.
    expect(page.locator("#train-progress")).to_contain_text(re.compile(r"step \d+/20"), timeout=120_000)
    expect(page.locator("#train-previews img").first).to_be_visible(timeout=60_000)
    page.wait_for_function("() => { const t = document.querySelector('#train-progress-text');"
                           " const m = t && t.textContent.match(/step (\\d+)\\//); return m && +m[1] >= 7; }",
                           timeout=120_000)
    expect(page.locator("#train-loss canvas, #train-loss svg").first).to_be_visible()
    expect(page.locator("#train-loss")).to_contain_text("smoothed")  # the legend: both series are drawn
    expect(page.locator("#train-stats")).to_contain_text("it/s")
    screenshot(page, "train-running")
    docs = ROOT / "docs" / "screenshots"
    docs.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(docs / "train.png"), full_page=True)

    page.click("#train-stop")
    expect(page.locator("#train-status")).to_contain_text("Stopped", timeout=60_000)
    stopped_at = _step(page)
    assert 0 < stopped_at < 20
    assert (app_server.home / "runs" / "browser-lora" / "checkpoints" / f"step-{stopped_at}").is_dir()

    page.click("#train-resume")
    expect(page.locator("#train-status")).to_contain_text("resum", timeout=30_000)
    # A reload reconnects to the running job (state lives in the Job) and shows the saved settings.
    page.reload(wait_until="domcontentloaded")
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-dataset textarea, #train-dataset input").first).to_have_value("datasets/faces")
    expect(page.locator("#train-status")).to_contain_text("Finished", timeout=240_000)
    assert _step(page) == 20
    assert (app_server.home / "models" / "lora" / "browser-lora.safetensors").is_file()
    log = (app_server.home / "runs" / "browser-lora" / "log.jsonl").read_text().splitlines()
    assert len(log) == 20
    expect(page.locator("#train-runs")).to_contain_text("browser-lora")
    screenshot(page, "train-finished")
