"""From photos to a ControlNet in a real browser: prepare canny pairs in the Dataset tab (image and control image
side by side), train a ControlNet from the Train tab with a live loss and each preview beside its control
image, then open it in the Playground and generate with it."""
from __future__ import annotations

import re
import time

import numpy as np
import pytest
from PIL import Image

from conftest import screenshot

pytestmark = pytest.mark.browser


@pytest.fixture
def single_thread_app_env(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the tiny model on a shared 2-core box


def _set(page, elem_id, value):
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(str(value))
    box.press("Tab")


def _pick(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.click()
    box.fill(value)
    page.keyboard.press("Enter")
    page.wait_for_timeout(300)


def _shapes(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    for i in range(n):
        a = np.full((96, 96, 3), 40 + 30 * i, np.uint8)
        x, y = rng.integers(8, 50, 2)
        a[y:y + 36, x:x + 36] = (230, 80, 50)
        Image.fromarray(a).save(folder / f"shape_{i}.png")


def test_canny_pairs_to_controlnet_to_playground(single_thread_app_env, app_server, page, tmp_path):
    from playwright.sync_api import expect

    home = app_server.home
    _shapes(home / "inputs" / "shapes")
    page.goto(app_server.url, wait_until="domcontentloaded")
    page.wait_for_selector("#tabs")

    # 1. Dataset tab: canny control images, shown beside their images.
    page.get_by_role("tab", name="Dataset").click()
    page.wait_for_selector("#ds-upload")
    page.wait_for_timeout(1500)  # the page-load event restores last-used settings first
    page.fill("#ds-name textarea", "edges")
    page.press("#ds-name textarea", "Enter")
    _set(page, "ds-source", "inputs/shapes")
    page.fill("#ds-trigger textarea", "sks")
    page.fill("#ds-class textarea", "shape")
    _pick(page, "ds-size", "64")
    page.get_by_label("filename").check()
    _pick(page, "ds-condition", "canny")
    page.click("#ds-scan")
    expect(page.locator("#ds-gallery")).to_contain_text("shape_0.png", timeout=60_000)
    page.locator("#ds-gallery button.thumbnail-item").first.click()
    expect(page.locator("#ds-condition-preview img")).to_be_visible(timeout=30_000)  # the detector, live
    page.click("#ds-prepare")
    expect(page.locator("#ds-status")).to_contain_text("4 kept", timeout=90_000)
    expect(page.locator("#ds-pairs")).to_contain_text("✓ shape_0.png", timeout=30_000)
    ds = home / "datasets" / "edges"
    assert len(list((ds / "conditioning" / "10_sks shape").glob("*.png"))) == 4
    screenshot(page, "conditioning-dataset")

    # 2. Use it in the Train tab: the ControlNet preset, shrunk to the tiny model on a CPU.
    page.click("#ds-use")
    expect(page.locator("#train-dataset textarea, #train-dataset input").first).to_have_value("datasets/edges")
    _pick(page, "train-preset", "controlnet-canny-sd15")
    expect(page.locator("#train-method input").first).to_have_value("controlnet", timeout=10_000)
    _pick(page, "train-base", "tiny")
    _set(page, "train-output-name", "edges-cn")
    for key, value in {"resolution": 64, "max-steps": 12, "sample-every": 6, "save-every": 0, "batch-size": 1,
                       "sample-prompts": "a photo of sks shape"}.items():
        _set(page, f"train-{key}", value)
    page.locator("#train-advanced").get_by_text("Advanced").first.click()
    _set(page, "train-sample-steps", 1)
    page.locator("#train-optimizer input").first.click()  # the preset's 8-bit AdamW needs CUDA: plain AdamW
    page.get_by_role("option", name="adamw", exact=True).click()
    expect(page.locator("#train-optimizer input").first).to_have_value("adamw")
    page.locator("#train-advanced").get_by_text("Advanced").first.click()
    page.click("#train-start")

    # Live: the loss plot, and each preview beside its control image.
    expect(page.locator("#train-status")).not_to_contain_text("Failed", timeout=5_000)
    expect(page.locator("#train-progress")).to_contain_text(re.compile(r"step \d+/12"), timeout=180_000)
    expect(page.locator("#train-loss canvas, #train-loss svg").first).to_be_visible(timeout=60_000)
    expect(page.locator("#train-previews")).to_contain_text("control image", timeout=120_000)
    expect(page.locator("#train-status")).to_contain_text("Finished", timeout=300_000)
    captions = page.locator("#train-previews").inner_text()
    assert captions.index("control image") < captions.index("step ")  # the condition first, its preview next
    screenshot(page, "conditioning-train")
    assert (home / "models" / "controlnet" / "edges-cn").is_dir()
    assert (home / "models" / "controlnet" / "edges-cn.safetensors").is_file()

    # 3. Open it in the Playground and generate with it.
    _pick(page, "train-run-pick", "edges-cn")
    page.click("#train-open-playground")
    expect(page.locator("#pg-title-0")).to_contain_text("ControlNet", timeout=30_000)
    edges = next((ds / "conditioning" / "10_sks shape").glob("*.png"))
    page.set_input_files("#pg-image-0 input[type=file]", str(edges))
    page.wait_for_timeout(1000)
    for elem, value in (("playground-width", 64), ("playground-height", 64), ("playground-steps", 3)):
        box = page.locator(f"#{elem} input[type=number]").first
        box.fill(str(value))
        box.press("Enter")
        page.wait_for_timeout(200)
    page.click("#playground-generate")
    end = time.time() + 180
    while time.time() < end and not list((home / "outputs").glob("*.png")):
        page.wait_for_timeout(500)
    pngs = list((home / "outputs").glob("*.png"))
    assert pngs, page.locator("#playground-status").inner_text()
    from sdstudio.playground.outputs import read_recipe

    recipe = read_recipe(pngs[0])
    # the published ControlNet (its original-layout file, which the Playground loads as well as the folder)
    assert len(recipe.controlnet) == 1 and recipe.controlnet[0].path.startswith("models/controlnet/edges-cn")
    screenshot(page, "conditioning-playground")
