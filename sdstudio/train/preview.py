"""Preview images during training: fixed prompts and seeds, drawn with the weights being trained (the
pipeline wraps the very modules that train; nothing is copied)."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from ..events import Preview
from ..formats.safe_io import atomic_write_bytes


def render_previews(method, c, cfg, run_dir: Path, step: int, autocast=contextlib.nullcontext) -> Preview | None:
    """One image per prompt in cfg.sample_prompts, saved as samples/step-NNNNNN-i.png."""
    from ..methods.base import hook

    prompts = [p for p in cfg.sample_prompts if p.strip()]
    if not prompts:
        return None
    modules = [c.unet, *c.text_encoders]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    paths = []
    try:
        pipe = hook(method, "preview_pipeline")(c)
        for i, prompt in enumerate(prompts):
            # A CPU generator makes the same image on every device for the same seed.
            gen = torch.Generator("cpu").manual_seed(cfg.sample_seed + i)
            with torch.no_grad(), autocast():
                image = pipe(prompt, num_inference_steps=cfg.sample_steps, guidance_scale=cfg.sample_guidance,
                             height=cfg.resolution, width=cfg.resolution, generator=gen).images[0]
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            path = Path(run_dir) / "samples" / f"step-{step:06d}-{i}.png"
            atomic_write_bytes(path, buf.getvalue())
            paths.append(str(path))
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    return Preview(step=step, paths=tuple(paths), captions=tuple(prompts))
