"""The real app in a real browser: it starts, binds to loopback, and every tab renders."""
from __future__ import annotations

import shutil

import pytest

from conftest import ROOT, screenshot

pytestmark = pytest.mark.browser


def test_app_opens_every_tab(app_server, page, tiny_dir):
    # A checkpoint in the workspace shows in the Library with its detected type.
    shutil.copytree(tiny_dir, app_server.home / "models" / "checkpoints" / "my-model")
    page.goto(app_server.url, wait_until="domcontentloaded")
    page.wait_for_selector("#tabs")
    for label in ("Quick", "Dataset", "Train", "Playground", "Library"):
        page.get_by_role("tab", name=label).click()
        page.wait_for_timeout(300)
        assert page.get_by_role("tab", name=label).get_attribute("aria-selected") == "true"
        shot = screenshot(page, f"tab-{label.lower()}")
        assert shot.stat().st_size > 10_000
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#fuse-panel")).to_contain_text("Fuse EDLoRA concepts")  # fusion is a Train-tab section
    page.get_by_role("tab", name="Library").click()
    page.click("#library-refresh")
    expect(page.locator("#library-models")).to_contain_text("my-model")
    expect(page.locator("#library-models")).to_contain_text("Checkpoint")
    docs = ROOT / "docs" / "screenshots"
    docs.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(docs / "library.png"), full_page=True)


def test_binds_loopback_only(app_server):
    import socket

    log = app_server.log.read_text()
    assert "127.0.0.1" in log
    # Connecting through a non-loopback address of this machine must fail (the server is not bound there).
    hostname_ip = None
    try:
        hostname_ip = socket.gethostbyname(socket.gethostname())
    except OSError:
        pass
    if hostname_ip and not hostname_ip.startswith("127."):
        with pytest.raises(OSError):
            socket.create_connection((hostname_ip, app_server.port), timeout=2).close()
