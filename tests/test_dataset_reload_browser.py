"""The Dataset tab in a real browser, on two things a user can see go wrong:

1. The manual crop that Prepare saves is the box the preview showed, to the pixel, whether the sliders were typed
   into, moved by keys or dragged. The source is per-pixel noise, so a box one pixel off gives another image.
2. A reload in the middle of the tab's work (a check of the images just started) restores every field the tab
   shows, and the selected dataset's gallery and summary.
One test, one app: a reload costs little, the app's start does not."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect

from browser_helpers import fill, hide_toasts, open_accordions, pick, read, wait_for_same
from test_playground_browser import single_thread_app_env  # noqa: F401 (a fixture: OMP_NUM_THREADS=1 for the app)

pytestmark = pytest.mark.browser


def _slider(page, elem_id: str) -> float:
    return float(read(page, elem_id))


def _note_box(page) -> tuple[int, int, int, int] | None:
    m = re.search(r"manual crop (\d+)x(\d+) at \((\d+), (\d+)\)", page.locator("#ds-crop-note").inner_text())
    if not m:
        return None
    w, h, left, top = map(int, m.groups())
    return left, top, left + w, top + h


def _expected_box(size, x, y, side) -> tuple[int, int, int, int]:
    """The box the sliders ask for, worked out here (not with the app's code): a square of `side` × the short
    edge, centred at (x, y) as fractions, pushed inside the picture."""
    w, h = size
    s = int(min(w, h) * side)
    left = int(min(max(x * w - s / 2, 0), w - s))
    top = int(min(max(y * h - s / 2, 0), h - s))
    return left, top, left + s, top + s


def test_dataset_manual_crop_is_the_previewed_box_and_reload_restores_every_field(single_thread_app_env, app_server,
                                                                                  page, console_errors):
    home = app_server.home
    src_dir = home / "inputs" / "crops"
    src_dir.mkdir(parents=True)
    rng = np.random.default_rng(7)
    source = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))  # 300x200, every pixel its own
    source.save(src_dir / "a_pattern.png")
    Image.fromarray(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)).save(src_dir / "b_other.png")

    page.goto(app_server.url, wait_until="domcontentloaded")
    hide_toasts(page)  # a toast over the form's column makes each action wait until it fades
    page.get_by_role("tab", name="Dataset").click()
    page.wait_for_selector("#ds-scan")
    page.wait_for_timeout(1500)  # the page-load event (last-used settings) lands before typing
    fill(page, "ds-name", "crops")
    fill(page, "ds-source", "inputs/crops")
    pick(page, "ds-size", "64")
    page.locator("#ds-captioner").get_by_label("none", exact=True).check()
    page.click("#ds-scan")
    gallery = page.locator("#ds-gallery")
    expect(gallery).to_contain_text("a_pattern.png", timeout=60_000)

    # 1. The manual box: select the pattern, type x, press keys on the size slider, drag y.
    page.locator("#ds-gallery button.thumbnail-item").first.click()
    expect(page.locator("#ds-crop-note")).to_contain_text("a_pattern.png", timeout=20_000)
    open_accordions(page, "#tab-dataset", ["Manual crop for the selected image"])
    page.locator("#ds-manual input[type=checkbox]").check()
    fill(page, "ds-man-x", 0.37)
    side = page.locator("#ds-man-side input[type=range]")
    side.focus()
    for _ in range(4):
        side.press("ArrowLeft")  # 1.00 -> 0.96
    y_range = page.locator("#ds-man-y input[type=range]")
    y_range.scroll_into_view_if_needed()
    r = y_range.bounding_box()
    page.mouse.move(r["x"] + r["width"] * 0.5, r["y"] + r["height"] / 2)
    page.mouse.down()
    page.mouse.move(r["x"] + r["width"] * 0.6, r["y"] + r["height"] / 2)
    page.mouse.move(r["x"] + r["width"] * 0.71, r["y"] + r["height"] / 2)
    page.mouse.up()
    x, y, s = (_slider(page, f"ds-man-{k}") for k in ("x", "y", "side"))
    assert x == pytest.approx(0.37) and s == pytest.approx(0.96) and y > 0.55, (x, y, s)  # all three moved
    want = _expected_box(source.size, x, y, s)
    # The preview follows every value the sliders show (no release needed): its note names the box it drew.
    page.wait_for_function(
        "(w) => (document.querySelector('#ds-crop-note')?.innerText || '').includes(w)",
        arg=f"manual crop {want[2] - want[0]}x{want[3] - want[1]} at ({want[0]}, {want[1]})", timeout=20_000)
    shown = _note_box(page)
    assert shown == want, (shown, want)

    page.click("#ds-man-keep")
    expect(page.get_by_text(f"at ({want[0]}, {want[1]}) kept for a_pattern.png").first).to_be_attached(timeout=10_000)
    kept = json.loads((home / "settings" / "dataset.json").read_text())["manual_crops"]["crops"]["a_pattern.png"]
    assert tuple(kept) == shown

    # 2. Prepare: the saved image is the source cut at the previewed box and resized to 64 (LANCZOS, as prepare
    #    resizes), pixel for pixel; a box one pixel off differs (checked, so the comparison can fail).
    page.click("#ds-prepare")
    expect(page.locator("#ds-status")).to_contain_text("2 kept", timeout=60_000)
    saved = np.asarray(Image.open(next((home / "datasets" / "crops" / "img").glob("*/a_pattern.png"))).convert("RGB"))
    expected = np.asarray(source.crop(shown).resize((64, 64), Image.Resampling.LANCZOS))
    assert saved.shape == (64, 64, 3)
    assert np.array_equal(saved, expected), f"max diff {np.abs(saved.astype(int) - expected).max()}"
    off = (shown[0] + 1, shown[1], shown[2] + 1, shown[3])
    assert not np.array_equal(saved, np.asarray(source.crop(off).resize((64, 64), Image.Resampling.LANCZOS)))

    # 3. Every field to a value that is not its default, then a check of the images (the tab's work), and a reload
    #    while it runs.
    open_accordions(page, "#tab-dataset", ["Advanced", "Class images (prior preservation)"])  # manual crop: open
    page.wait_for_timeout(500)  # freshly mounted inputs take their values before typing
    page.locator("#ds-crop").get_by_label("bucket", exact=True).check()
    page.locator("#ds-captioner").get_by_label("wd14", exact=True).check()
    for elem, value in {"ds-trigger": "ohwx", "ds-class": "toy", "ds-repeats": 3, "ds-caption-model": "my-tagger",
                        "ds-gen-th": 0.5, "ds-char-th": 0.7, "ds-exclude": "hat, scarf", "ds-min-side": 32,
                        "ds-reg-count": 5, "ds-reg-steps": 7}.items():
        fill(page, elem, value)
    for elem in ("ds-rembg", "ds-underscores", "ds-skip-dupes"):
        page.locator(f"#{elem} input[type=checkbox]").check()
    pick(page, "ds-rembg-model", "my-rembg.onnx")
    pick(page, "ds-condition", "canny")
    page.wait_for_timeout(500)
    fields = ["ds-name", "ds-source", "ds-size", "ds-crop", "ds-captioner", "ds-trigger", "ds-class", "ds-repeats",
              "ds-rembg", "ds-condition", "ds-caption-model", "ds-gen-th", "ds-char-th", "ds-exclude",
              "ds-underscores", "ds-rembg-model", "ds-min-side", "ds-skip-dupes", "ds-reg-count", "ds-reg-steps"]
    fields += ["ds-manual", "ds-man-x", "ds-man-y", "ds-man-side"]
    before = {f: read(page, f) for f in fields}
    assert before["ds-crop"] == "bucket" and before["ds-reg-count"] == "5" and before["ds-rembg"] is True, before
    assert before["ds-rembg-model"] == "my-rembg.onnx" and before["ds-condition"] == "canny", before
    page.click("#ds-scan")
    expect(page.locator("#ds-status")).to_contain_text("check images", timeout=20_000)
    console_errors.reload(wait_until="domcontentloaded")
    page.get_by_role("tab", name="Dataset").click()
    expect(page.locator("#ds-summary")).to_contain_text("2 training images", timeout=20_000)  # the same dataset
    expect(gallery).to_contain_text("a_pattern.png")
    open_accordions(page, "#tab-dataset", ["Advanced", "Class images (prior preservation)",
                                            "Manual crop for the selected image"])
    assert wait_for_same(page, before) == {}
    # The selected image's crop preview comes back too, with the same box.
    expect(page.locator("#ds-crop-note")).to_contain_text("a_pattern.png", timeout=20_000)
    assert _note_box(page) == shown, (page.locator("#ds-crop-note").inner_text(),
                                      json.loads((home / "settings" / "dataset.json").read_text())["crop_view"])
    assert console_errors == [], console_errors
