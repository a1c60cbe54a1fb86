"""GLIGEN boxes in a real browser: draw two boxes on the Playground's canvas, label them, pick a GLIGEN module
file for the tiny base, generate, drag one box elsewhere, generate again. The PNGs carry both boxes."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import screenshot
from test_playground_browser import _wait_outputs

pytestmark = pytest.mark.browser


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def _drag(page, stage, a, b) -> None:
    """Press at fraction a of the canvas and release at fraction b (with the canvas in view: the mouse only
    reaches what is on screen)."""
    stage.evaluate("n => n.scrollIntoView({block: 'center'})")
    r = stage.bounding_box()
    page.mouse.move(r["x"] + a[0] * r["width"], r["y"] + a[1] * r["height"])
    page.mouse.down()
    page.mouse.move(r["x"] + (a[0] + b[0]) / 2 * r["width"], r["y"] + (a[1] + b[1]) / 2 * r["height"], steps=3)
    page.mouse.move(r["x"] + b[0] * r["width"], r["y"] + b[1] * r["height"], steps=3)
    page.mouse.up()


def test_draw_two_boxes_generate_move_one_generate_again(monkeypatch, app_server, page, tmp_path):
    from playwright.sync_api import expect

    from sdstudio.cli import main
    from sdstudio.playground.outputs import read_recipe

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    home = app_server.home
    assert main(["tiny-model", str(tmp_path / "tg"), "--gligen", str(tmp_path / "gligen.safetensors")]) == 0
    (home / "models" / "gligen").mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / "gligen.safetensors", home / "models" / "gligen" / "tiny-gligen.safetensors")

    page.goto(app_server.url, wait_until="domcontentloaded")
    page.get_by_role("tab", name="Playground").click()
    for elem, value in (("playground-width", 64), ("playground-height", 64), ("playground-steps", 4)):
        _set_number(page, elem, value)
    page.get_by_text("Boxes: GLIGEN phrases and regions").click()
    gligen = page.locator("#playground-gligen input").first
    gligen.click()
    gligen.fill("models/gligen/tiny-gligen.safetensors")
    gligen.press("Enter")
    gligen.press("Tab")
    stage = page.locator("#playground-box-editor .bx-stage")
    expect(stage).to_be_visible()
    label = page.locator("#playground-box-editor .bx-label")

    _drag(page, stage, (0.05, 0.55), (0.45, 0.95))
    expect(label).to_be_focused()
    label.type("a red car")
    label.press("Tab")
    _drag(page, stage, (0.55, 0.05), (0.95, 0.45))
    label.type("a small dog")
    label.press("Tab")
    expect(page.locator("#playground-box-editor .bx-box")).to_have_count(2)
    expect(page.locator("#playground-box-editor .bx-tag").nth(1)).to_contain_text("a small dog")

    page.click("#playground-generate")
    first = _wait_outputs(home, 1, page)
    expect(page.locator("#playground-status")).to_contain_text("saved", timeout=60_000)

    # Drag the car's box to the top left, then generate again.
    _drag(page, stage, (0.25, 0.75), (0.25, 0.3))
    expect(page.locator("#playground-box-editor .bx-coords")).not_to_have_value("")
    page.click("#playground-generate")
    pngs = _wait_outputs(home, 2, page)
    expect(page.locator("#playground-status")).to_contain_text("saved", timeout=60_000)

    r1, r2 = read_recipe(first[0]), read_recipe(pngs[-1])
    assert [g.phrase for g in r1.grounding] == ["a red car", "a small dog"]
    assert r1.gligen == "models/gligen/tiny-gligen.safetensors"
    car1, dog1 = (g.box for g in r1.grounding)
    car2, dog2 = (g.box for g in r2.grounding)
    assert np.allclose(car1, (0.05, 0.55, 0.45, 0.95), atol=0.03) and np.allclose(dog1, (0.55, 0.05, 0.95, 0.45),
                                                                                     atol=0.03)
    assert dog2 == dog1 and np.isclose(car2[1], car1[1] - 0.45, atol=0.03) and np.isclose(car2[0], car1[0], atol=0.02)
    assert not np.array_equal(np.asarray(Image.open(first[0])), np.asarray(Image.open(pngs[-1])))
    screenshot(page, "playground-boxes")
