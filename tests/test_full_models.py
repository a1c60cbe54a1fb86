"""Full-size random models (models/full.py): SD 1.5's and SDXL's real configs, counted on the meta device (nothing
is allocated, so this stays light), and only benchmarks may load one."""
from __future__ import annotations

import json

import pytest

from sdstudio.errors import UserError
from sdstudio.models.full import build_full, family_name


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sd15_has_the_published_parameter_counts():
    parts = build_full("sd15", device="meta")
    assert _count(parts["unet"]) == 859_520_964  # "859.5 M"
    assert _count(parts["vae"]) == 83_653_863
    assert _count(parts["text_encoder"]) == 123_060_480  # CLIP ViT-L/14's text tower
    assert "text_encoder_2" not in parts
    assert type(parts["scheduler"]).__name__ == "PNDMScheduler"
    assert len([n for n, _ in parts["unet"].named_modules() if n.endswith("attn2")]) == 16


def test_sdxl_has_the_published_parameter_counts():
    parts = build_full("sdxl", device="meta")
    assert _count(parts["unet"]) == 2_567_463_684  # "2.6 B"
    assert _count(parts["vae"]) == 83_653_863
    assert _count(parts["text_encoder"]) == 123_060_480  # CLIP-L
    assert _count(parts["text_encoder_2"]) == 694_659_840  # OpenCLIP bigG with its projection
    assert parts["unet"].config.cross_attention_dim == 2048
    assert len([n for n, _ in parts["unet"].named_modules() if n.endswith("attn2")]) == 70
    assert type(parts["scheduler"]).__name__ == "EulerDiscreteScheduler"


def test_arch_names():
    assert family_name("sd15") == "sd1" and family_name("sdxl") == "sdxl" and family_name("sd1") == "sd1"
    with pytest.raises(UserError, match="use sd15 or sdxl"):
        family_name("sd3")


def test_only_a_benchmark_may_load_a_full_size_random_model(tmp_path, tiny_dir):
    """The guard reads the marker file, so a tiny folder with the marker stands in for a 1.7 GB one."""
    import shutil

    from sdstudio.models.full import MARKER, is_benchmark_model
    from sdstudio.models.loading import load_base

    folder = tmp_path / "sd15-random"
    shutil.copytree(tiny_dir, folder)
    (folder / MARKER).write_text(json.dumps({"family": "sd1", "purpose": "benchmark"}))
    assert is_benchmark_model(folder)
    with pytest.raises(UserError, match="made for benchmarks"):
        load_base(str(folder))
    assert load_base(str(folder), benchmark=True).family.name == "sd1"


def test_cli_writes_a_marked_model_and_refuses_a_single_file(tmp_path, monkeypatch):
    """`tiny-model --size full` on the CPU would write 3.4 GB: the writer is run with the tiny configs standing in
    for the full ones (same code path: build, save_pipeline, marker)."""
    from sdstudio.cli import main
    from sdstudio.models import full, tiny

    def small(arch, device="cpu", dtype=None):
        parts = tiny.build_components(full.family_name(arch))
        return {k: (v.to(dtype=dtype) if dtype is not None and hasattr(v, "to") else v) for k, v in parts.items()}

    monkeypatch.setattr(full, "build_full", small)
    out = tmp_path / "xl"
    assert main(["tiny-model", str(out), "--size", "full", "--family", "sdxl", "--dtype", "fp16"]) == 0
    marker = json.loads((out / full.MARKER).read_text())
    assert marker["family"] == "sdxl" and marker["purpose"] == "benchmark"
    assert (out / "text_encoder_2" / "config.json").is_file() and (out / "tokenizer_2" / "vocab.json").is_file()
    from safetensors import safe_open

    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor("conv_in.weight").dtype.itemsize == 2  # fp16 on disk
    assert main(["tiny-model", str(tmp_path / "x"), "--size", "full", "--single-file", str(tmp_path / "x.st")]) == 2
