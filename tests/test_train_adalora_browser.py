"""The Train tab in a real browser with AdaLoRA: choosing the method shows its view, and a run on tiny draws each
layer's rank as bars and the budget schedule, live, until it finishes."""
from __future__ import annotations

import re

import pytest

from browser_helpers import pick
from conftest import screenshot
from train_helpers import make_kohya_dataset

pytestmark = pytest.mark.browser


def _set(page, elem_id, value):
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(str(value))
    box.press("Tab")


def test_adalora_run_draws_rank_bars_and_the_budget(app_server, page):
    from playwright.sync_api import expect

    make_kohya_dataset(app_server.home / "datasets" / "faces", n=2, repeats=1)
    page.goto(app_server.url, wait_until="domcontentloaded")
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-adalora").first).to_be_hidden()  # Gradio nests a Group in a div of the same id
    method = page.locator("#train-method input").first
    method.click()
    method.fill("adalora")
    page.keyboard.press("Enter")
    expect(page.locator("#train-adalora").first).to_be_visible(timeout=10_000)
    pick(page, "train-base", "tiny")  # the preset names the real SD 1.5, out of reach offline
    _set(page, "train-dataset", "datasets/faces")
    _set(page, "train-output-name", "browser-adalora")
    for key, value in {"resolution": 64, "max-steps": 12, "sample-every": 0, "save-every": 0}.items():
        _set(page, f"train-{key}", value)
    page.click("#train-start")

    expect(page.locator("#train-progress")).to_contain_text(re.compile(r"step \d+/12"), timeout=180_000)
    expect(page.locator("#train-adalora-ranks canvas, #train-adalora-ranks svg").first).to_be_visible(timeout=60_000)
    expect(page.locator("#train-adalora-budget")).to_contain_text("budget schedule", timeout=60_000)
    expect(page.locator("#train-status")).to_contain_text("Finished", timeout=300_000)
    expect(page.locator("#train-adalora-budget")).to_contain_text("total rank now")
    screenshot(page, "train-adalora")
    assert (app_server.home / "models" / "lora" / "browser-adalora.safetensors").is_file()
