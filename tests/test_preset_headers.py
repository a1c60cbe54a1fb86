"""The presets' measured-memory lines are generated from presets/measured-vram.json (sdstudio bench vram), never
typed: every preset in the repository agrees with the generator, and the generator adds, updates and removes
exactly its own block."""
from __future__ import annotations

import shutil

import pytest

from sdstudio.train.config import PRESETS_DIR, list_presets, preset_header
from sdstudio.train.preset_headers import MEASURED_NOTE, PREFIX, UNMEASURED, read_measurements, render, sync_headers

M = {"total_gb": 3.71, "peak_reserved_gb": 3.2, "peak_allocated_gb": 2.9, "context_gb": 0.51, "resolution": 512,
     "batch": 1, "device_name": "NVIDIA H200", "torch": "2.14.1", "estimate_gb": 4.7, "date": "2026-12-01"}


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_header_is_what_the_generator_makes(name):
    path = PRESETS_DIR / f"{name}.toml"
    text = path.read_text(encoding="utf-8")
    assert render(text, read_measurements().get(name)) == text, \
        f"{name}: its '{PREFIX}' lines differ from presets/measured-vram.json; run `sdstudio bench vram` on a GPU"


def test_generator_adds_updates_and_removes_its_block(tmp_path):
    presets = tmp_path / "presets"
    shutil.copytree(PRESETS_DIR, presets)
    name = "object-ti-sd15"
    original = (presets / f"{name}.toml").read_text(encoding="utf-8")
    assert UNMEASURED in original and PREFIX not in original

    assert sync_headers({name: M}, presets) == [name]
    text = (presets / f"{name}.toml").read_text(encoding="utf-8")
    header = text[: text.index("\nmethod")]
    assert header.splitlines()[-2].startswith(PREFIX)  # the last header lines, wrapped
    assert "3.7 GB peak (3.2 GB reserved by PyTorch" in header.replace("\n#   ", " ")
    assert "NVIDIA H200" in header.replace("\n#   ", " ") and MEASURED_NOTE in header and UNMEASURED not in header
    assert text[len(header):] == original[original.index("\nmethod"):]  # the settings are untouched
    assert sync_headers({name: M}, presets) == []  # idempotent

    assert sync_headers({name: dict(M, total_gb=4.2)}, presets) == [name]
    assert "4.2 GB peak" in (presets / f"{name}.toml").read_text(encoding="utf-8")

    assert sync_headers({}, presets) == [name]
    assert (presets / f"{name}.toml").read_text(encoding="utf-8") == original


def test_preset_header_still_reads_the_estimate_after_a_measurement(tmp_path, monkeypatch):
    from sdstudio.train import config

    presets = tmp_path / "presets"
    shutil.copytree(PRESETS_DIR, presets)
    sync_headers({"character-lora-sd15-6gb": M}, presets)
    monkeypatch.setattr(config, "PRESETS_DIR", presets)
    header = preset_header("character-lora-sd15-6gb")
    assert "VRAM: about" in header and "Measured VRAM: 3.7 GB" in header
