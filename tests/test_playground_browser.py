"""The Playground tab in a real browser: stack two LoRAs and a ControlNet, generate, change a weight, generate
again; the two PNGs carry their recipes. Saves docs/screenshots/playground.png for the README."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, screenshot

pytestmark = pytest.mark.browser


@pytest.fixture
def single_thread_app_env(monkeypatch):
    # The app runs the tiny model on a shared 2-core box: one OpenMP thread avoids spin-wait slowdowns.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _put_models(home, tiny_components):
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    from test_playground_stack import kohya_lora

    (home / "models" / "lora").mkdir(parents=True, exist_ok=True)
    save_file(kohya_lora(tiny_components, 1, scale=0.1), home / "models" / "lora" / "style.safetensors")
    save_file(kohya_lora(tiny_components, 2, rank=8, alpha=2.0, scale=0.1), home / "models" / "lora" / "detail.safetensors")
    torch.manual_seed(0)
    cn = ControlNetModel.from_unet(tiny_components.unet)
    cn.save_pretrained(home / "models" / "controlnet" / "edges")


def _pick(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.click()
    box.fill(value)
    page.keyboard.press("Enter")
    page.wait_for_timeout(300)


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")
    page.wait_for_timeout(200)


def _wait_outputs(home, n: int, page, timeout=180):
    end = time.time() + timeout
    while time.time() < end:
        pngs = sorted((home / "outputs").glob("*.png"), key=lambda p: p.stat().st_mtime)
        if len(pngs) >= n:
            return pngs
        page.wait_for_timeout(500)
    raise AssertionError(f"no output after {timeout}s; status: {page.locator('#playground-status').inner_text()}")


def test_stack_two_loras_and_a_controlnet_generate_change_weight_generate(single_thread_app_env, app_server, page,
                                                                        tiny_components, tmp_path):
    from playwright.sync_api import expect

    from sdstudio.playground.outputs import read_recipe

    home = app_server.home
    _put_models(home, tiny_components)
    edges = tmp_path / "edges.png"
    rng = np.random.default_rng(0)
    Image.fromarray(((rng.random((64, 64)) > 0.8) * 255).astype(np.uint8)).convert("RGB").save(edges)

    page.goto(app_server.url, wait_until="domcontentloaded")
    page.get_by_role("tab", name="Playground").click()
    page.click("#playground-refresh")
    page.wait_for_timeout(500)
    _pick(page, "playground-add-file", "models/lora/style.safetensors")
    page.click("#playground-add")
    expect(page.locator("#pg-title-0")).to_contain_text("style.safetensors")
    _pick(page, "playground-add-file", "models/lora/detail.safetensors")
    page.click("#playground-add")
    expect(page.locator("#pg-title-1")).to_contain_text("detail.safetensors")
    _pick(page, "playground-add-kind", "ControlNet")
    _pick(page, "playground-add-file", "models/controlnet/edges")
    page.click("#playground-add")
    expect(page.locator("#pg-title-2")).to_contain_text("ControlNet")
    page.set_input_files("#pg-image-2 input[type=file]", str(edges))
    page.wait_for_timeout(1000)
    _pick(page, "pg-pre-2", "canny")
    for elem, value in (("playground-width", 64), ("playground-height", 64), ("playground-steps", 4)):
        _set_number(page, elem, value)
    _set_number(page, "pg-weight-1", 0.5)

    page.click("#playground-generate")
    first = _wait_outputs(home, 1, page)
    expect(page.locator("#playground-status")).to_contain_text("saved", timeout=30_000)
    _set_number(page, "pg-weight-0", 0.2)
    page.click("#playground-generate")
    pngs = _wait_outputs(home, 2, page)
    expect(page.locator("#playground-gallery img").first).to_be_visible(timeout=30_000)

    r1, r2 = read_recipe(first[0]), read_recipe(pngs[-1])
    assert [it.weight for it in r1.lora] == [0.8, 0.5]
    assert [it.weight for it in r2.lora] == [0.2, 0.5]
    # The text-encoder weight followed each UNet weight (they started equal), so the recipe needs no override.
    assert [it.text_encoder_weight for it in r2.lora] == [None, None]
    assert len(r2.controlnet) == 1 and r2.controlnet[0].preprocessor == "canny" and r2.controlnet[0].image
    assert not np.array_equal(np.asarray(Image.open(first[0])), np.asarray(Image.open(pngs[-1])))
    # An X/Y grid over LoRA #1's weight and the seed: one labelled image, through the same Job machinery.
    page.get_by_text("X/Y grid", exact=True).click()
    page.fill("#playground-grid-x textarea", "lora_weight[0]=0,1")
    page.fill("#playground-grid-y textarea", "seed=1,2")
    page.click("#playground-grid-run")
    end = time.time() + 180
    while time.time() < end and not list((home / "outputs").glob("grid-*.png")):
        page.wait_for_timeout(500)
    grid = next((home / "outputs").glob("grid-*.png"))
    assert Image.open(grid).size[0] >= 128 and Image.open(grid).size[1] >= 128
    expect(page.locator("#playground-status")).to_contain_text("saved", timeout=30_000)

    # Dropping the first PNG back restores its recipe: the prompt, and LoRA #1's weight of 0.8.
    page.fill("#playground-prompt textarea", "something else")
    page.locator("#playground-recipe-toml").page.get_by_text("Recipe", exact=True).click()
    page.set_input_files("#playground-png-drop input[type=file]", str(first[0]))
    expect(page.locator("#playground-prompt textarea")).to_have_value(r1.prompt, timeout=15_000)
    expect(page.locator("#pg-weight-0 input[type=number]")).to_have_value("0.8")
    page.wait_for_timeout(800)
    screenshot(page, "playground")
    docs = ROOT / "docs" / "screenshots"
    docs.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(docs / "playground.png"), full_page=True)
