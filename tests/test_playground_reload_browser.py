"""The Playground in a real browser: a reload before Generate, and one in the middle of a generation, restore
every field the tab shows
(prompt, negative, sampler, steps, CFG, seed, size, batch, CLIP skip, strength, the fuse switch, the grid axes) and
the stack of cards with each card's switch, weights, step range and block weights; the generation still finishes.
One test on the tiny model: setting the fields and a reload cost seconds, the app's start is the cost."""
from __future__ import annotations

import time

import pytest
from playwright.sync_api import expect

from browser_helpers import fill, open_accordions, pick, read, wait_for_same
from test_playground_browser import _put_models, single_thread_app_env  # noqa: F401 (a fixture)

pytestmark = pytest.mark.browser

BLOCKS = "0,1,1,1,1,1,1,1,1,1,1,1,1,0.5,0.5,0.5,0.5"  # 17 values: BASE, IN01..., as A1111's block weights


ACCORDIONS = ["img2img / inpaint", "Advanced", "X/Y grid"]


def test_playground_reload_mid_generation_restores_form_grid_and_stack(single_thread_app_env, app_server, page,
                                                                       tiny_components, console_errors):
    home = app_server.home
    _put_models(home, tiny_components)  # two LoRAs (style, detail) and a ControlNet
    page.goto(app_server.url, wait_until="domcontentloaded")
    page.get_by_role("tab", name="Playground").click()
    page.wait_for_timeout(1500)  # the page-load event (last-used settings) lands before typing
    for i, name in enumerate(["style", "detail"]):
        pick(page, "playground-add-file", f"models/lora/{name}.safetensors")
        page.click("#playground-add")
        expect(page.locator(f"#pg-title-{i}")).to_contain_text(f"{name}.safetensors")

    # Every field to a value that is not its default.
    fill(page, "playground-prompt", "a red fox in the snow")
    fill(page, "playground-negative", "blurry, text")
    pick(page, "playground-sampler", "dpm++2m_karras")
    values = {"playground-steps": 3, "playground-cfg": 4.5, "playground-seed": 1234, "playground-width": 72,
              "playground-height": 64}
    open_accordions(page, "#tab-playground", ACCORDIONS)
    page.wait_for_timeout(500)
    values.update({"playground-batch": 2, "playground-clip-skip": 2, "playground-strength": 0.6})
    for elem, value in values.items():
        fill(page, elem, value)
    page.locator("#playground-fuse input[type=checkbox]").uncheck()
    fill(page, "playground-grid-x", "cfg=3,5")
    fill(page, "playground-grid-y", "seed=1,2")
    # The cards: #0 weight 0.3 (its text-encoder weight follows), range 0.1-0.9; #1 off, text encoder set apart
    # first (0.6), then UNet -0.5, and block weights.
    fill(page, "pg-weight-0", 0.3)
    fill(page, "pg-start-0", 0.1)
    fill(page, "pg-end-0", 0.9)
    fill(page, "pg-te-1", 0.6)
    fill(page, "pg-weight-1", -0.5)
    fill(page, "pg-blocks-1", BLOCKS)
    page.locator("#pg-enabled-1 input[type=checkbox]").uncheck()
    page.wait_for_timeout(500)
    fields = ["playground-prompt", "playground-negative", "playground-sampler", "playground-steps", "playground-cfg",
              "playground-seed", "playground-width", "playground-height", "playground-batch", "playground-clip-skip",
              "playground-strength", "playground-fuse", "playground-grid-x", "playground-grid-y"] + [
        f"pg-{f}-{i}" for i in (0, 1) for f in ("enabled", "weight", "te", "start", "end", "blocks")]
    before = {f: read(page, f) for f in fields}
    want = {"playground-sampler": "dpm++2m_karras", "playground-seed": "1234", "playground-width": "72",
            "playground-fuse": False, "pg-weight-0": "0.3", "pg-te-0": "0.3", "pg-start-0": "0.1",
            "pg-enabled-1": False, "pg-te-1": "0.6", "pg-weight-1": "-0.5", "pg-blocks-1": BLOCKS,
            "playground-grid-y": "seed=1,2", "playground-clip-skip": "2", "playground-strength": "0.6"}
    assert {k: before[k] for k in want} == want  # the page took every value (so the reload has something to lose)

    # A reload before Generate keeps every edit too: each is saved as it is made.
    console_errors.reload(wait_until="domcontentloaded")
    page.get_by_role("tab", name="Playground").click()
    expect(page.locator("#pg-title-1")).to_contain_text("detail.safetensors", timeout=20_000)
    open_accordions(page, "#tab-playground", ACCORDIONS)
    assert wait_for_same(page, before) == {}

    # Generate, and reload while it runs.
    page.click("#playground-generate")
    expect(page.locator("#playground-status")).to_contain_text("started", timeout=30_000)
    console_errors.reload(wait_until="domcontentloaded")
    page.get_by_role("tab", name="Playground").click()
    expect(page.locator("#pg-title-1")).to_contain_text("detail.safetensors", timeout=20_000)
    open_accordions(page, "#tab-playground", ACCORDIONS)
    assert wait_for_same(page, before) == {}

    # The page reconnects to the generation, which finishes with the settings it started with.
    end = time.time() + 180
    while time.time() < end and len(list((home / "outputs").glob("*.png"))) < 2:
        page.wait_for_timeout(500)
    pngs = sorted((home / "outputs").glob("*.png"))
    assert len(pngs) == 2, page.locator("#playground-status").inner_text()
    from sdstudio.playground.outputs import read_recipe

    recipe = read_recipe(pngs[0])
    assert recipe.sampler == "dpm++2m_karras" and recipe.steps == 3 and (recipe.width, recipe.height) == (72, 64)
    assert [(it.weight, it.enabled) for it in recipe.lora] == [(0.3, True), (-0.5, False)]
    expect(page.locator("#playground-status")).to_contain_text("saved", timeout=60_000)
    assert console_errors == [], console_errors
