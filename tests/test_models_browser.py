"""The Library's model panels in a real browser: import a single-file LoRA through the Library and find it in the
Playground's list; an A1111 folder given with --models-from shows its LoRA there too, and is never written."""
from __future__ import annotations

import hashlib

import pytest

from conftest import AppServer

pytestmark = pytest.mark.browser


@pytest.fixture
def a1111_app(tmp_path, tiny_components):
    from safetensors.torch import save_file

    from test_playground_stack import kohya_lora

    a1111 = tmp_path / "webui"
    (a1111 / "models" / "Lora").mkdir(parents=True)
    save_file(kohya_lora(tiny_components, 3), a1111 / "models" / "Lora" / "their-style.safetensors")
    server = AppServer(tmp_path / "ws", ["--models-from", str(a1111)])
    yield server, a1111
    server.stop()


def _options(page, elem_id: str) -> list[str]:
    """The option labels of a Gradio dropdown, read by opening it."""
    page.locator(f"#{elem_id} input").first.click()
    page.wait_for_timeout(300)
    labels = page.locator("ul[role=listbox] li").all_inner_texts()
    page.keyboard.press("Escape")
    return [t.strip() for t in labels]


def test_import_a_lora_in_the_library_then_pick_it_in_the_playground(a1111_app, page, tiny_components, tmp_path):
    from playwright.sync_api import expect
    from safetensors.torch import save_file

    from test_playground_stack import kohya_lora

    server, a1111 = a1111_app
    before = {p: p.stat().st_mtime_ns for p in a1111.rglob("*")}
    lora = tmp_path / "downloads" / "civitai-style.safetensors"
    lora.parent.mkdir()
    save_file(kohya_lora(tiny_components, 5), lora)
    sha = hashlib.sha256(lora.read_bytes()).hexdigest()

    page.goto(server.url, wait_until="domcontentloaded")
    page.get_by_role("tab", name="Library").click()
    expect(page.locator("#library-models-from")).to_contain_text(str(a1111), timeout=10_000)
    page.set_input_files("#library-import-file input[type=file]", str(lora))
    page.wait_for_timeout(1000)  # the upload lands before the click reads it
    page.click("#library-import")
    result = page.locator("#library-import-result")
    expect(result).to_contain_text(sha[:10], timeout=60_000)  # A1111's short hash, so civitai pages match
    expect(result).to_contain_text("LoRA")
    expect(result).to_contain_text("models/lora/civitai-style.safetensors")
    assert (server.home / "models" / "lora" / "civitai-style.safetensors").read_bytes() == lora.read_bytes()

    page.get_by_role("tab", name="Playground").click()
    page.click("#playground-refresh")
    page.wait_for_timeout(500)
    options = _options(page, "playground-add-file")
    assert "models/lora/civitai-style.safetensors" in options, options
    assert any(o.endswith("their-style.safetensors (webui, read-only)") for o in options), options
    assert {p: p.stat().st_mtime_ns for p in a1111.rglob("*")} == before  # the other app's folder: untouched
