"""The Train tab in a real browser, on a machine without CUDA: the 6 GB preset (8-bit Adam) shows the optimizer
change before Start, starts, trains, stops, says "nothing to resume" in UI words for a run that never saved, resumes,
survives a reload with every field restored, and finishes; the runs table shows each state with steps done of
total. The LoRA appears in the workspace's models/lora. No console errors on the way."""
from __future__ import annotations

import re
import shutil

import pytest
from playwright.sync_api import expect

from browser_helpers import fill, hide_toasts, open_accordions, pick, read_all, train_form_ids, wait_for_values
from conftest import ROOT, screenshot
from train_helpers import make_kohya_dataset

pytestmark = pytest.mark.browser
# A run too long to end by itself in the test: on a busy 2-core machine the page can lag the job by tens of
# steps, so Pause and Stop must not race the end. It then finishes through "Resume up to step".
STEPS = 1000
MORE = 8


def _step(page) -> int:
    m = re.search(r"step (\d+)/", page.locator("#train-progress").inner_text())
    return int(m[1]) if m else 0


def _runs_row(page, name: str):
    return page.locator("#train-runs tr", has_text=name).first


def test_train_tab_6gb_preset_on_cpu_start_stop_resume_reload_finish(app_server, page, console_errors):
    make_kohya_dataset(app_server.home / "datasets" / "faces", n=3, repeats=2)
    page.goto(app_server.url, wait_until="domcontentloaded")
    page.get_by_role("tab", name="Train").click()

    # 1. The 6 GB preset: its description, and before Start, what this machine changes (no CUDA: no 8-bit Adam).
    pick(page, "train-preset", "character-lora-sd15-6gb")
    expect(page.locator("#train-preset-info")).to_contain_text("6 GB card", timeout=20_000)
    machine = page.locator("#train-machine")
    expect(machine).to_contain_text("optimizer adamw8bit → adamw", timeout=60_000)
    expect(machine).to_contain_text("8-bit Adam needs a CUDA GPU")
    expect(machine).to_contain_text("on the CPU")
    pick(page, "train-base", "tiny")
    fill(page, "train-dataset", "datasets/faces")
    fill(page, "train-output-name", "browser-lora")
    for key, value in {"resolution": 64, "max-steps": STEPS, "sample-every": 0, "save-every": 0}.items():
        fill(page, f"train-{key}", value)
    open_accordions(page, "#tab-train", ["Advanced"])
    fill(page, "train-sample-steps", 1)
    page.wait_for_timeout(500)  # the last Number commits on blur before Start reads the form
    page.click("#train-start")

    # 2. It trains. Pause holds it early (a tiny run would otherwise end before a look): the loss plot, the
    #    previews and the stats stay, and the runs table says paused, with steps done of total.
    expect(page.locator("#train-previews img").first).to_be_visible(timeout=120_000)
    page.wait_for_function("() => { const t = document.querySelector('#train-progress-text');"
                           " const m = t && t.textContent.match(/step (\\d+)\\//); return m && +m[1] >= 2; }",
                           timeout=120_000)
    page.click("#train-pause")
    expect(_runs_row(page, "browser-lora")).to_contain_text("paused", timeout=30_000)
    expect(_runs_row(page, "browser-lora")).to_contain_text(re.compile(rf"\d+/{STEPS}"))
    expect(page.locator("#train-loss canvas, #train-loss svg").first).to_be_visible()
    expect(page.locator("#train-loss")).to_contain_text("smoothed")  # the legend: both series are drawn
    expect(page.locator("#train-stats")).to_contain_text("it/s")
    config = __import__("tomllib").loads((app_server.home / "runs" / "browser-lora" / "config.toml").read_text())
    assert config["optimizer"] == "adamw" and config["gradient_checkpointing"] is True  # the preset, fitted
    hide_toasts(page)
    open_accordions(page, "#tab-train", ["Advanced"])  # fold it again for the screenshot
    screenshot(page, "train-running")
    docs = ROOT / "docs" / "screenshots"
    docs.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(docs / "train.png"), full_page=True)

    # 3. Stop (from the pause): it answers, keeps a checkpoint, and the runs table says stopped.
    page.click("#train-stop")
    expect(page.locator("#train-status")).to_contain_text("Stopped", timeout=60_000)
    expect(page.locator("#train-progress")).to_contain_text("stopped at step")
    stopped_at = _step(page)
    assert 0 < stopped_at < STEPS
    assert (app_server.home / "runs" / "browser-lora" / "checkpoints" / f"step-{stopped_at}").is_dir()
    expect(_runs_row(page, "browser-lora")).to_contain_text("stopped", timeout=20_000)
    page.click("#train-stop")  # Stop with nothing running still answers
    expect(page.get_by_text("No run is in progress").first).to_be_attached(timeout=10_000)  # toasts are hidden by CSS here

    # 4. A run that never saved: Resume says so in the UI's words, not the CLI's.
    never = app_server.home / "runs" / "never-saved"
    never.mkdir()
    shutil.copy(app_server.home / "runs" / "browser-lora" / "config.toml", never / "config.toml")
    pick(page, "train-run-pick", "never-saved")
    page.click("#train-resume")
    expect(page.locator("#train-status")).to_contain_text("stopped before it saved a checkpoint", timeout=20_000)
    expect(page.locator("#train-status")).not_to_contain_text("--resume")

    # 5. Resume up to a few more steps, and reload while it runs: every field of the form comes back (the settings
    #    it started with), and the page reconnects to the job.
    open_accordions(page, "#tab-train", ["Advanced", "Advanced lora settings"])
    ids = ["train-preset", "train-method", "train-base", "train-dataset", "train-output-name",
           *train_form_ids(config)]
    before = read_all(page, ids)
    assert before["train-max-steps"] == str(STEPS) and before["train-dataset"] == "datasets/faces"
    pick(page, "train-run-pick", "browser-lora")
    fill(page, "train-resume-steps", stopped_at + MORE)
    page.wait_for_timeout(300)
    page.click("#train-resume")
    expect(page.locator("#train-status")).to_contain_text("resum", timeout=30_000)
    console_errors.reload(wait_until="domcontentloaded")
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-preset-info")).to_contain_text("6 GB card", timeout=20_000)
    open_accordions(page, "#tab-train", ["Advanced", "Advanced lora settings"])
    assert wait_for_values(page, before) == {}

    # 6. It finishes: every step in the log, the LoRA in models/lora, the runs table says finished, N/N.
    end = stopped_at + MORE
    expect(page.locator("#train-status")).to_contain_text("Finished", timeout=240_000)
    assert _step(page) == end
    assert (app_server.home / "models" / "lora" / "browser-lora.safetensors").is_file()
    log = (app_server.home / "runs" / "browser-lora" / "log.jsonl").read_text().splitlines()
    assert len(log) == end
    expect(_runs_row(page, "browser-lora")).to_contain_text("finished", timeout=20_000)
    expect(_runs_row(page, "browser-lora")).to_contain_text(f"{end}/{end}")
    screenshot(page, "train-finished")
    assert console_errors == [], console_errors
