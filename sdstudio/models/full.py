"""Full-size random models, for benchmarks only: SD 1.5's and SDXL's real configs (UNet, VAE, text encoders,
tokenizers, scheduler) with random weights, built offline.

Speed and memory depend on the architecture, not on the weights' values, so these give true figures on a GPU
with no model hub. They draw noise, so nothing but a benchmark may use one as a model: the folder carries a
marker (`sdstudio_benchmark.json`) and `load_base` refuses it unless the caller says it is a benchmark.

SD 1.5's UNet has 859,520,964 parameters, SDXL's 2,567,463,684 (tests/test_full_models.py checks the counts on
the meta device, where nothing is allocated).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

MARKER = "sdstudio_benchmark.json"
FAMILIES = {"sd15": "sd1", "sdxl": "sdxl"}  # what the CLI calls them -> models/families.py's names
SEED = 4321


def family_name(arch: str) -> str:
    """"sd15" / "sdxl" (or the family names "sd1" / "sdxl") -> the family name."""
    if arch in FAMILIES.values():
        return arch
    try:
        return FAMILIES[arch]
    except KeyError:
        raise UserError(f"Unknown architecture {arch!r}: use sd15 or sdxl.") from None


def build_full(arch: str, device: str = "cpu", dtype=None) -> dict:
    """The pipeline's modules at full size, random weights from a fixed seed, made directly on `device`.
    On the meta device nothing is allocated (parameter counts, FLOP counts)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .families import get_family

    fam = get_family(family_name(arch))
    if device != "meta":
        torch.manual_seed(SEED)
    with torch.device(device):
        unet = UNet2DConditionModel(**fam.unet)
        vae = AutoencoderKL(**fam.vae)
        tes = [(CLIPTextModelWithProjection if cls.endswith("Projection") else CLIPTextModel)(CLIPTextConfig(**cfg))
               for cls, cfg, _pad in fam.text]
    sched_cls = {"PNDMScheduler": PNDMScheduler, "EulerDiscreteScheduler": EulerDiscreteScheduler}[fam.scheduler[0]]
    parts = dict(unet=unet, vae=vae, text_encoder=tes[0], scheduler=sched_cls(**fam.scheduler[1]))
    if len(tes) > 1:
        parts["text_encoder_2"] = tes[1]
    for name, m in parts.items():
        if name != "scheduler":
            m.eval().requires_grad_(False)
            if dtype is not None:
                m.to(dtype=dtype)
    return parts


def write_full_model(out: Path | str, arch: str, device: str = "cpu", dtype=None) -> Path:
    """Write a full-size random model as a diffusers folder (fp16 halves the disk: 1.7 GB for SD 1.5, 6.9 GB
    for SDXL), marked as a benchmark model."""
    from .tiny import save_pipeline

    fam = family_name(arch)
    parts = build_full(arch, device=device, dtype=dtype)
    marker = {"family": fam, "seed": SEED, "purpose": "benchmark",
              "note": "random weights at full size: it draws noise; only `sdstudio bench` and the gpu tests use it"}
    return save_pipeline(Path(out), parts, marker, marker_name=MARKER)


def is_benchmark_model(folder: Path | str) -> bool:
    return (Path(folder) / MARKER).is_file()


def benchmark_family(folder: Path | str) -> str:
    return json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))["family"]


def refuse_unless_benchmark(folder: Path, benchmark: bool) -> None:
    if not benchmark and is_benchmark_model(folder):
        raise UserError(f"{folder} is a full-size random model made for benchmarks (sdstudio tiny-model --size full): "
                        f"it draws only noise, so it cannot be a base model; use it with `sdstudio bench`.")
