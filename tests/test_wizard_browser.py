"""The Quick tab in a real browser on tiny: upload 6 photos, name, class, press the one button, watch every
stage, the loss plot and the final grid, then open the LoRA in the Playground and generate with it."""
from __future__ import annotations

import pytest
from playwright.sync_api import expect

from conftest import ROOT, screenshot
from wizard_helpers import make_photos

pytestmark = pytest.mark.browser
DOCS = ROOT / "docs" / "screenshots"


def _fill(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(str(value))
    box.press("Tab")


def _stage(page, sid: str, state: str, timeout: float = 120_000):
    expect(page.locator(f'#quick-stages li[data-stage="{sid}"]')).to_have_attribute("data-state", state,
                                                                                      timeout=timeout)


def _hide_toasts(page) -> None:
    """Hide Gradio's toasts for a screenshot. Clicking their close buttons raced their own fade-out in CI
    (the button goes inert, then leaves the DOM, and the click waits 30 s), so hide them with CSS instead."""
    page.add_style_tag(content=".toast-wrap, .toast-body { display: none !important; }")


def test_quick_tab_whole_flow(app_server, page, tmp_path):
    photos = make_photos(tmp_path / "photos", 6)
    page.goto(app_server.url, wait_until="domcontentloaded")
    expect(page.get_by_role("tab", name="Quick")).to_have_attribute("aria-selected", "true", timeout=60_000)

    # Too few photos: one clear sentence, nothing starts.
    page.locator("#quick-photos input[type=file]").set_input_files([str(p) for p in photos[:3]])
    _fill(page, "quick-name", "mira")
    page.locator("#quick-start").click()
    expect(page.get_by_text("Only 3 photo(s)").first).to_be_visible(timeout=20_000)
    assert not list((app_server.home / "runs").glob("*"))

    # Six photos, name, class, test-size overrides in the Advanced accordion, the one button.
    page.locator("#quick-photos button[aria-label='Clear']").first.click()
    page.locator("#quick-photos input[type=file]").set_input_files([str(p) for p in photos])
    page.locator("#quick-class input").first.fill("woman")
    page.locator("#quick-class input").first.press("Enter")
    page.locator("#quick-advanced").get_by_text("Advanced").first.click()
    _fill(page, "quick-steps", 30)
    _fill(page, "quick-res", 64)
    _fill(page, "quick-sample-steps", 2)
    for elem, value in (("quick-steps", "30"), ("quick-res", "64"), ("quick-sample-steps", "2")):
        expect(page.locator(f"#{elem} input")).to_have_value(value)
    page.wait_for_timeout(500)  # let the last change reach the server before the click reads the form
    page.locator("#quick-start").click()
    expect(page.locator("#quick-status")).to_contain_text("30 steps", timeout=30_000)

    _stage(page, "check", "done")
    _stage(page, "crop", "done")
    _stage(page, "caption", "done")  # no BLIP offline: trigger + class captions, with a note
    _stage(page, "regularize", "skipped")
    _stage(page, "train", "running", 180_000)
    expect(page.locator("#quick-progress")).to_contain_text("Train: step", timeout=120_000)
    _hide_toasts(page)  # the earlier warning toast would hide the plot in the screenshot
    page.wait_for_timeout(1000)
    DOCS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(DOCS / "quick-running.png"), full_page=True)

    _stage(page, "playground", "done", 240_000)
    for sid in ("check", "crop", "caption", "preset", "train", "grid"):
        _stage(page, sid, "done", 5_000)
    expect(page.locator("#quick-status")).to_contain_text("Done", timeout=20_000)
    expect(page.locator("#quick-loss canvas, #quick-loss svg").first).to_be_visible(timeout=20_000)
    expect(page.locator("#quick-grid img")).to_be_visible(timeout=20_000)
    result = page.locator("#quick-result")
    expect(result).to_contain_text("models/lora/mira-woman.safetensors")
    expect(result).to_contain_text("models/Lora")  # where it goes for A1111
    expect(result).to_contain_text("models/loras")  # and for ComfyUI
    assert (app_server.home / "models" / "lora" / "mira-woman.safetensors").is_file()
    assert (app_server.home / "runs" / "mira-woman" / "samples" / "final-grid.png").is_file()
    page.wait_for_timeout(1500)  # let the plot draw its lines
    screenshot(page, "quick-finished")
    page.screenshot(path=str(DOCS / "quick-finished.png"), full_page=True)

    # Any step opens in its own tab with the wizard's choices filled in.
    page.locator("#quick-open-dataset").click()
    expect(page.get_by_role("tab", name="Dataset")).to_have_attribute("aria-selected", "true", timeout=20_000)
    expect(page.locator("#ds-name input, #ds-name textarea").first).to_have_value("mira-woman")
    expect(page.locator("#ds-trigger input, #ds-trigger textarea").first).to_have_value("mira")
    page.get_by_role("tab", name="Quick").click()
    page.locator("#quick-open-train").click()
    expect(page.get_by_role("tab", name="Train")).to_have_attribute("aria-selected", "true", timeout=20_000)
    expect(page.locator("#train-dataset input, #train-dataset textarea").first).to_have_value("datasets/mira-woman")
    page.get_by_role("tab", name="Quick").click()

    # Open in Playground: the LoRA lands in the stack, and one generation with it succeeds.
    page.locator("#quick-open-playground").click()
    expect(page.get_by_role("tab", name="Playground")).to_have_attribute("aria-selected", "true", timeout=20_000)
    if page.locator("#playground-generate").count() == 0:
        pytest.skip("this build's Playground tab is a placeholder: the hand-over is checked up to the tab switch")
    expect(page.locator("#pg-title-0")).to_contain_text("mira-woman", timeout=20_000)
    _fill(page, "playground-prompt", "a photo of mira woman")
    for elem, value in (("playground-steps", 2), ("playground-width", 64), ("playground-height", 64)):
        _fill(page, elem, value)
    page.locator("#playground-generate").click()
    expect(page.locator("#playground-gallery img").first).to_be_visible(timeout=120_000)
    assert list((app_server.home / "outputs").rglob("*.png"))
