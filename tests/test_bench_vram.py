"""`sdstudio bench vram` on the CPU (the tiny model stands in for the full-size one, RSS for GPU memory): it runs
each preset through the loop, writes its table and measurements, leaves the presets alone off CUDA, and
`--apply` turns a GPU run's file into the presets' header lines."""
from __future__ import annotations

import json
import shutil

import pytest

from sdstudio.cli import main
from sdstudio.train.config import PRESETS_DIR


def test_bench_vram_writes_its_table(tmp_path, capsys, tiny_dir):
    before = {p.name: p.read_text() for p in PRESETS_DIR.glob("*.toml")}
    out = tmp_path / "vram.json"
    assert main(["bench", "vram", "--device", "cpu", "--arch", "tiny", "--presets",
                 "character-lora-sd15-6gb,object-ti-sd15", "--steps", "1", "--jobs", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "character-lora-sd15-6gb" in text and "object-ti-sd15" in text and "estimate" in text
    data = json.loads(out.read_text())
    assert set(data["presets"]) == {"character-lora-sd15-6gb", "object-ti-sd15"}
    six = data["presets"]["character-lora-sd15-6gb"]
    assert six["resolution"] == 64 and six["batch"] == 1 and six["total_gb"] > 0.1  # measured (RSS on the CPU)
    assert six["estimate_gb"] == pytest.approx(4.7, abs=0.05)  # the preset as written (512 px), from the estimator
    assert six["total_gb"] == pytest.approx(six["peak_reserved_gb"] + six["context_gb"])
    assert {p.name: p.read_text() for p in PRESETS_DIR.glob("*.toml")} == before  # no CPU figure reaches a preset


def test_apply_regenerates_the_headers_from_a_gpu_file(tmp_path, monkeypatch, capsys):
    from sdstudio.train import preset_headers

    presets = tmp_path / "presets"
    shutil.copytree(PRESETS_DIR, presets)
    monkeypatch.setattr(preset_headers, "PRESETS_DIR", presets)
    monkeypatch.setattr(preset_headers, "MEASUREMENTS", presets / "measured-vram.json")
    gpu_file = tmp_path / "from-gpu.json"
    m = dict(total_gb=3.61, peak_reserved_gb=3.1, peak_allocated_gb=2.7, context_gb=0.55, resolution=512, batch=1,
             device_name="NVIDIA H200", torch="2.11.0", estimate_gb=4.7, date="2026-12-02")
    gpu_file.write_text(json.dumps({"presets": {"character-lora-sd15-6gb": m}}))
    assert main(["bench", "vram", "--apply", str(gpu_file)]) == 0
    assert "character-lora-sd15-6gb" in capsys.readouterr().out
    assert json.loads((presets / "measured-vram.json").read_text())["presets"]["character-lora-sd15-6gb"] == m
    assert "# Measured VRAM: 3.6 GB peak" in (presets / "character-lora-sd15-6gb.toml").read_text()
    assert main(["bench", "vram", "--apply", str(tmp_path / "missing.json")]) == 2
