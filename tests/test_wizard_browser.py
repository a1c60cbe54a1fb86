"""The Quick tab in a real browser on tiny: upload 6 photos, name, class, press the one button, reload in the middle
and find the form and the run again, watch every stage, the loss plot and the final grid; the LoRA shows in the
Playground's list, the Library and the Train tab's runs table without a Refresh click; "Open in Train tab" fills
every field from the run's config.toml, "Open in Dataset tab" shows the dataset at once; then the LoRA generates in
the Playground. No console errors on the way."""
from __future__ import annotations

import tomllib

import pytest
from playwright.sync_api import expect

from browser_helpers import fill, hide_toasts, open_accordions, read, train_form_differences, wait_for_values
from conftest import ROOT, screenshot
from wizard_helpers import make_photos

pytestmark = pytest.mark.browser
DOCS = ROOT / "docs" / "screenshots"


def _stage(page, sid: str, state: str, timeout: float = 120_000):
    expect(page.locator(f'#quick-stages li[data-stage="{sid}"]')).to_have_attribute("data-state", state,
                                                                                      timeout=timeout)


def test_quick_tab_whole_flow(app_server, page, console_errors, tmp_path):
    photos = make_photos(tmp_path / "photos", 6)
    page.goto(app_server.url, wait_until="domcontentloaded")
    expect(page.get_by_role("tab", name="Quick")).to_have_attribute("aria-selected", "true", timeout=60_000)

    # Too few photos: one clear sentence, nothing starts.
    page.locator("#quick-photos input[type=file]").set_input_files([str(p) for p in photos[:3]])
    fill(page, "quick-name", "mira")
    page.locator("#quick-start").click()
    expect(page.get_by_text("Only 3 photo(s)").first).to_be_visible(timeout=20_000)
    assert not list((app_server.home / "runs").glob("*"))

    # Six photos, name, class, test-size overrides in the Advanced accordion. No GPU here: the memory choice is
    # the CPU, and the plan says so, timed from a measured step, with the captions that will really be written.
    page.locator("#quick-photos button[aria-label='Clear']").first.click()
    page.locator("#quick-photos input[type=file]").set_input_files([str(p) for p in photos])
    page.locator("#quick-class input").first.fill("woman")
    page.locator("#quick-class input").first.press("Enter")
    expect(page.locator("#quick-memory input[value='0']")).to_be_checked()
    page.locator("#quick-advanced").get_by_text("Advanced").first.click()
    typed = {"quick-steps": "20", "quick-res": "64", "quick-sample-steps": "2"}
    for elem, value in typed.items():
        fill(page, elem, value)
    for elem, value in typed.items():
        expect(page.locator(f"#{elem} input")).to_have_value(value)
    plan = page.locator("#quick-estimate")
    expect(plan).to_contain_text("on the CPU", timeout=60_000)
    expect(plan).to_contain_text("20 steps")
    expect(plan).to_contain_text("measured")
    expect(plan).to_contain_text("captions: 'mira woman' only")  # no BLIP model offline: said before it runs
    page.locator("#quick-start").click()
    expect(page.locator("#quick-status")).to_contain_text("20 steps", timeout=30_000)
    _stage(page, "train", "running", 180_000)
    expect(page.locator("#quick-progress")).to_contain_text("Train: step", timeout=120_000)
    hide_toasts(page)  # the earlier warning toast would hide the plot in the screenshot
    page.wait_for_timeout(1000)
    DOCS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(DOCS / "quick-running.png"), full_page=True)

    # A reload in the middle of the run: the form as it was started, and the run's stages again.
    console_errors.reload(wait_until="domcontentloaded")
    expect(page.get_by_role("tab", name="Quick")).to_have_attribute("aria-selected", "true", timeout=60_000)
    page.locator("#quick-advanced").get_by_text("Advanced").first.click()
    assert wait_for_values(page, {"quick-name": "mira", "quick-class": "woman", "quick-memory": "0",
                                  "quick-reg": False, "quick-steps": "20", "quick-res": "64",
                                  "quick-sample-steps": "2", "quick-captioner": "auto"}) == {}
    expect(page.locator("#quick-photos")).to_contain_text("photo_5")
    expect(page.locator("#quick-estimate")).to_contain_text("on the CPU", timeout=30_000)
    _stage(page, "check", "done", 30_000)  # the page reconnected to the job
    # The Train tab's runs table shows the Quick run (running, or finished by now), with no Refresh click. (A tab
    # mounts when first shown; it then stays on the page, hidden, and keeps redrawing.)
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-runs")).to_contain_text("mira-woman", timeout=20_000)
    page.get_by_role("tab", name="Library").click()
    expect(page.locator("#library-models")).to_be_visible()
    page.get_by_role("tab", name="Quick").click()

    # Training done: the LoRA is published. Within 2 s, with no Refresh click, the Library and the Train tab's
    # runs table show it (they redraw on the workspace's change counter).
    _stage(page, "train", "done", 240_000)
    page.wait_for_function(
        """() => {
          const lib = document.querySelector('#library-models');
          const runs = document.querySelector('#train-runs');
          return lib && lib.textContent.includes('mira-woman') && runs && /mira-woman[\\s\\S]*finished/.test(runs.textContent);
        }""", timeout=2_000)

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

    # "Open in Train tab": every field equals the run's own config.toml (what trained, not the form's defaults).
    page.locator("#quick-open-train").click()
    expect(page.get_by_role("tab", name="Train")).to_have_attribute("aria-selected", "true", timeout=20_000)
    config = tomllib.loads((app_server.home / "runs" / "mira-woman" / "config.toml").read_text())
    expect(page.locator("#train-output-name textarea, #train-output-name input").first).to_have_value("mira-woman")
    open_accordions(page, "#tab-train", ["Advanced", "Advanced lora settings"])
    diff = train_form_differences(page, config, app_server.home)
    assert diff == {}, diff
    expect(page.locator("#train-preset-info")).to_contain_text("6 GB" if "6gb" in read(page, "train-preset")
                                                                else "8 GB")

    # "Open in Dataset tab": the dataset as the wizard made it, drawn at once (no blur of the name box needed).
    page.get_by_role("tab", name="Quick").click()
    page.locator("#quick-open-dataset").click()
    expect(page.get_by_role("tab", name="Dataset")).to_have_attribute("aria-selected", "true", timeout=20_000)
    assert wait_for_values(page, {"ds-name": "mira-woman", "ds-trigger": "mira", "ds-class": "woman",
                                  "ds-repeats": "1", "ds-captioner": "none"}) == {}
    expect(page.locator("#ds-summary")).to_contain_text("6 training images", timeout=10_000)
    expect(page.locator("#ds-cap-0 textarea")).to_have_value("mira woman", timeout=10_000)
    expect(page.locator("#ds-gallery img")).to_have_count(6, timeout=10_000)

    # Open in Playground: the LoRA lands in the stack, and one generation with it succeeds. The LoRA is in the
    # "File" list too, though nobody pressed "Refresh files".
    page.get_by_role("tab", name="Quick").click()
    page.locator("#quick-open-playground").click()
    expect(page.get_by_role("tab", name="Playground")).to_have_attribute("aria-selected", "true", timeout=20_000)
    expect(page.locator("#pg-title-0")).to_contain_text("mira-woman", timeout=20_000)
    page.locator("#playground-add-file input").first.click()
    expect(page.get_by_role("option", name="models/lora/mira-woman.safetensors")).to_be_visible()
    page.keyboard.press("Escape")
    fill(page, "playground-prompt", "a photo of mira woman")
    for elem, value in (("playground-steps", 2), ("playground-width", 64), ("playground-height", 64)):
        fill(page, elem, value)
    page.locator("#playground-generate").click()
    expect(page.locator("#playground-gallery img").first).to_be_visible(timeout=120_000)
    assert list((app_server.home / "outputs").rglob("*.png"))
    assert console_errors == [], console_errors
