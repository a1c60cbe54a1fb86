"""Preview images during training: fixed prompts and seeds, drawn with the weights being trained (the
pipeline wraps the very modules that train; nothing is copied).

A method that trains on control images (its `conditioning` names "control") previews each prompt with a
validation control image, as diffusers' train_controlnet.py does with --validation_image: the run's
`sample_conditions`, else the dataset's first control images. Each is saved once as samples/condition-i.png,
and the Preview event names it beside the image it steered.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from ..errors import UserError
from ..events import Preview
from ..formats.safe_io import atomic_write_bytes


def check_sample_conditions(cfg) -> None:
    """Every validation control image the config names exists and opens (part of the preflight)."""
    from ..data.images import open_rgb

    for text in getattr(cfg, "sample_conditions", []) or []:
        p = Path(text).expanduser()
        if not p.is_file():
            raise UserError(f"The preview control image {text} does not exist: fix sample_conditions, or leave it "
                            f"empty to use the dataset's first control images.")
        open_rgb(p)  # raises a UserError naming what is wrong with it


def preview_conditions(cfg, data, run_dir: Path) -> list[str]:
    """The control image for each preview prompt, saved at the training resolution as samples/condition-i.png;
    [] when the dataset carries no control images."""
    from PIL import Image

    from ..data.conditioning import Cut
    from ..data.images import open_rgb

    if data is None or "control" not in getattr(data, "conditions", {}):
        return []
    prompts = [p for p in cfg.sample_prompts if p.strip()]
    given = [Path(t).expanduser() for t in (getattr(cfg, "sample_conditions", []) or [])]
    pool = given or list(dict.fromkeys(data.sources["control"][i] for i in data.instance_idx or range(len(data.items))))
    out = []
    for i in range(len(prompts)):
        src = pool[min(i, len(pool) - 1)] if given else pool[i % len(pool)]
        im = open_rgb(src)
        im = Cut(im.size, (cfg.resolution, cfg.resolution)).image(im, Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        path = Path(run_dir) / "samples" / f"condition-{i}.png"
        atomic_write_bytes(path, buf.getvalue())
        out.append(str(path))
    return out


def _control_image(pipe, path: str):
    """The preview's control image as the pipeline's control model takes it (grey for a 1-channel adapter)."""
    from PIL import Image

    im = Image.open(path).convert("RGB")
    model = getattr(pipe, "adapter", None) or getattr(pipe, "controlnet", None)
    cfg = getattr(model, "config", None)
    channels = getattr(cfg, "in_channels", None) or getattr(cfg, "conditioning_channels", 3)
    return im.convert("L") if channels == 1 else im


# Previews above this size decode the latents in overlapping tiles of this size: decoding a whole 1024 px SDXL
# image needs ~5 GB (twice that when diffusers upcasts SDXL's fp16 VAE to fp32), more than the step itself on an
# 8-12 GB card; one tile needs what a 512 px image does. Training never decodes, so only previews change.
PREVIEW_TILE_PX = 512


@contextlib.contextmanager
def tiled_decode(vae, resolution: int, tile_px: int | None = None):
    """Within the block, `vae` decodes images larger than `tile_px` in tiles of `tile_px` (25% overlap, blended),
    as A1111's and ComfyUI's tiled VAE decode; its own tiling settings come back afterwards."""
    tile_px = tile_px or PREVIEW_TILE_PX
    if resolution <= tile_px or not hasattr(vae, "enable_tiling"):
        yield
        return
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    saved = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size)
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile_px, tile_px // factor
    vae.use_tiling = True
    try:
        yield
    finally:
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = saved


def render_previews(method, c, cfg, run_dir: Path, step: int, autocast=contextlib.nullcontext,
                    conditions: list[str] | None = None) -> Preview | None:
    """One image per prompt in cfg.sample_prompts, saved as samples/step-NNNNNN-i.png; with `conditions`, prompt
    i is drawn under control image i."""
    from ..methods.base import hook

    prompts = [p for p in cfg.sample_prompts if p.strip()]
    if not prompts:
        return None
    conditions = conditions or []
    modules = [m for _prefix, m in hook(method, "trainable_modules")(c)]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    paths = []
    try:
        with tiled_decode(c.vae, cfg.resolution):
            pipe = hook(method, "preview_pipeline")(c)
            for i, prompt in enumerate(prompts):
                # A CPU generator makes the same image on every device for the same seed.
                gen = torch.Generator("cpu").manual_seed(cfg.sample_seed + i)
                extra = {"image": _control_image(pipe, conditions[i])} if i < len(conditions) else {}
                with torch.no_grad(), autocast():
                    image = pipe(prompt, num_inference_steps=cfg.sample_steps, guidance_scale=cfg.sample_guidance,
                                 height=cfg.resolution, width=cfg.resolution, generator=gen, **extra).images[0]
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                path = Path(run_dir) / "samples" / f"step-{step:06d}-{i}.png"
                atomic_write_bytes(path, buf.getvalue())
                paths.append(str(path))
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    return Preview(step=step, paths=tuple(paths), captions=tuple(prompts),
                   conditions=tuple(conditions[:len(paths)]))
