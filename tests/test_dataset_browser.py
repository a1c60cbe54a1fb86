"""The Dataset tab in a real browser: upload photos, see their status, preview a crop, prepare, caption, edit a
caption and find it saved on disk."""
from __future__ import annotations

import pytest
from playwright.sync_api import expect

from conftest import ROOT, screenshot
from test_dataset_prepare import noise, photo

pytestmark = pytest.mark.browser


def test_dataset_tab_upload_prepare_caption_edit(app_server, page, tmp_path):
    src = tmp_path / "upload"
    src.mkdir()
    photo("astronaut", (320, 320)).save(src / "astronaut_portrait.jpg")
    photo("chelsea").save(src / "chelsea-the-cat.png")
    photo("coffee", (400, 300)).save(src / "morning_coffee.jpg")
    noise(5, (300, 260)).save(src / "texture.png")
    (src / "broken.jpg").write_text("not a picture")
    files = sorted(str(p) for p in src.iterdir())

    page.goto(app_server.url, wait_until="domcontentloaded")
    page.wait_for_selector("#tabs")
    page.get_by_role("tab", name="Dataset").click()  # the Quick tab opens first
    page.wait_for_selector("#ds-upload")
    page.wait_for_timeout(1500)  # let the page-load event (which restores last-used settings) land before typing
    page.fill("#ds-name textarea", "toys")
    page.press("#ds-name textarea", "Enter")
    page.fill("#ds-trigger textarea", "sks")
    page.fill("#ds-class textarea", "toy")
    page.locator("#ds-upload input[type=file]").set_input_files(files)

    # 1. The upload lands in the workspace and is checked: a badge per image, the broken file skipped with why.
    gallery = page.locator("#ds-gallery")
    expect(gallery).to_contain_text("✗ skipped broken.jpg", timeout=60_000)
    expect(gallery).to_contain_text("chelsea-the-cat.png")
    assert (app_server.home / "inputs" / "toys" / "morning_coffee.jpg").is_file()
    assert page.input_value("#ds-source textarea") == "inputs/toys"

    # 2. A crop preview on the selected image.
    page.locator("#ds-gallery button.thumbnail-item").first.click()
    expect(page.locator("#ds-crop-preview img")).to_be_visible(timeout=20_000)
    expect(page.locator("#ds-crop-note")).to_contain_text("crop")

    # 3. Prepare (crop centre, captions from file names).
    page.get_by_label("filename").check()
    page.click("#ds-prepare")
    expect(page.locator("#ds-status")).to_contain_text("4 kept", timeout=60_000)
    ds = app_server.home / "datasets" / "toys"
    concept = ds / "img" / "10_sks toy"
    assert sorted(p.name for p in concept.glob("*.png")) == [
        "astronaut_portrait.png", "chelsea-the-cat.png", "morning_coffee.png", "texture.png"]
    assert (concept / "morning_coffee.txt").read_text().strip() == "sks toy, morning coffee"
    expect(page.locator("#ds-summary")).to_contain_text("4 training images")
    expect(page.locator("#ds-summary")).to_contain_text("broken.jpg")

    # 4. A caption pass as a job, then the editor shows the new captions.
    page.fill("#ds-trigger textarea", "ohwx")
    page.click("#ds-caption")
    expect(page.locator("#ds-status")).to_contain_text("caption: done", timeout=60_000)
    assert (concept / "texture.txt").read_text().strip() == "ohwx toy, texture"
    expect(page.locator("#ds-cap-0 textarea")).to_have_value("ohwx toy, astronaut portrait", timeout=20_000)

    # 5. Edit one caption by keyboard: type, Tab away, and it is on disk.
    box = page.locator("#ds-cap-1 textarea")
    box.fill("ohwx toy, a grey cat on a sofa")
    box.press("Tab")
    expect_file = concept / "chelsea-the-cat.txt"
    for _ in range(80):  # the caption file, then metadata.jsonl, are written by the blur handler
        if (expect_file.read_text().strip() == "ohwx toy, a grey cat on a sofa"
                and "a grey cat on a sofa" in (ds / "metadata.jsonl").read_text()):
            break
        page.wait_for_timeout(250)
    assert expect_file.read_text().strip() == "ohwx toy, a grey cat on a sofa"
    assert "a grey cat on a sofa" in (ds / "metadata.jsonl").read_text()

    # 6. Class images with the base model (tiny), as a job with the same progress bar.
    # The accordion mounts its inputs when it opens, and a freshly mounted Number can take its initial value
    # from the server after Playwright has typed into it (CI once generated the default 100 images). So type,
    # Tab away to commit, and check both values stuck before clicking.
    page.get_by_text("Class images (prior preservation)").click()
    for sel in ("#ds-reg-count input", "#ds-reg-steps input"):
        expect(page.locator(sel)).to_be_visible()
    page.wait_for_timeout(500)
    for sel in ("#ds-reg-count input", "#ds-reg-steps input"):
        page.fill(sel, "1")
        page.press(sel, "Tab")
    page.wait_for_timeout(300)
    for sel in ("#ds-reg-count input", "#ds-reg-steps input"):
        expect(page.locator(sel)).to_have_value("1")
    page.click("#ds-reg")
    expect(page.locator("#ds-status")).to_contain_text("class images: done", timeout=90_000)
    assert sorted(p.name for p in (ds / "reg" / "1_toy").glob("*.png")) == ["class_00000.png"]
    expect(page.locator("#ds-summary")).to_contain_text("1 class images")

    screenshot(page, "dataset")
    docs = ROOT / "docs" / "screenshots"
    docs.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(docs / "dataset.png"), full_page=True)

    # 7. A reload loses nothing: the same dataset, gallery and captions come back from the workspace.
    page.reload(wait_until="domcontentloaded")
    page.wait_for_selector("#tabs")
    page.get_by_role("tab", name="Dataset").click()  # the Quick tab opens first
    expect(page.locator("#ds-cap-1 textarea")).to_have_value("ohwx toy, a grey cat on a sofa", timeout=20_000)
    assert page.input_value("#ds-name textarea") == "toys"
    expect(page.locator("#ds-gallery")).to_contain_text("✗ skipped broken.jpg")

    # 8. Hand it to the Train tab.
    page.click("#ds-use")
    expect(page.get_by_role("tab", name="Train")).to_have_attribute("aria-selected", "true", timeout=10_000)
