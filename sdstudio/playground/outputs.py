"""Generated images on disk: PNG with A1111's `parameters` text chunk (so A1111, civitai and ComfyUI read the
settings) plus our full recipe as TOML in an `sdstudio_recipe` chunk, so dropping the PNG back restores it."""
from __future__ import annotations

import io
import re
import time
from pathlib import Path

from ..errors import UserError
from .recipe import Recipe

RECIPE_CHUNK = "sdstudio_recipe"
SAMPLER_LABELS = {
    "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "lms": "LMS", "dpm2": "DPM2", "dpm2_a": "DPM2 a",
    "dpm++2m": "DPM++ 2M", "dpm++2m_karras": "DPM++ 2M Karras", "dpm++2m_sde": "DPM++ 2M SDE",
    "dpm++2m_sde_karras": "DPM++ 2M SDE Karras", "dpm++2s_a": "DPM++ 2S a", "ddim": "DDIM", "pndm": "PLMS",
    "unipc": "UniPC", "deis": "DEIS",
}


def a1111_parameters(recipe: Recipe) -> str:
    """The text A1111 writes into its PNGs; LoRAs appear as <lora:name:weight> tags, as A1111 writes them."""
    tags = "".join(f" <lora:{Path(it.path).stem}:{it.weight:g}>" for it in recipe.lora if it.enabled)
    lines = [recipe.prompt + tags]
    if recipe.negative_prompt:
        lines.append(f"Negative prompt: {recipe.negative_prompt}")
    fields = [f"Steps: {recipe.steps}", f"Sampler: {SAMPLER_LABELS.get(recipe.sampler, recipe.sampler)}",
              f"CFG scale: {recipe.cfg:g}", f"Seed: {recipe.seed}", f"Size: {recipe.width}x{recipe.height}",
              f"Model: {Path(recipe.base_model).stem if recipe.base_model != 'tiny' else 'tiny'}"]
    if recipe.init_image:
        fields.append(f"Denoising strength: {recipe.strength:g}")
    if recipe.clip_skip > 1:
        fields.append(f"Clip skip: {recipe.clip_skip}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def png_bytes(image, recipe: Recipe) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt("parameters", a1111_parameters(recipe))
    info.add_itxt(RECIPE_CHUNK, recipe.to_toml())
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_images(images, recipe: Recipe, out_dir: Path | str, prefix: str = "") -> list[Path]:
    """Save a batch atomically: image i carries the recipe that remakes it alone (seed + i, batch 1)."""
    from ..formats.safe_io import atomic_write_bytes

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = []
    for i, img in enumerate(images):
        single = recipe.replace(seed=recipe.seed + i, batch=1)
        name = f"{prefix}{stamp}-{single.seed}"
        path = out_dir / f"{name}.png"
        n = 1
        while path.exists():
            path = out_dir / f"{name}-{n}.png"
            n += 1
        paths.append(atomic_write_bytes(path, png_bytes(img, single)))
    return paths


def read_recipe(path_or_file) -> Recipe:
    """The recipe inside a PNG: ours when present, else one rebuilt from A1111's `parameters` text."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path_or_file) as img:
            text = dict(getattr(img, "text", {}) or img.info)
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{Path(str(path_or_file)).name} is not a readable PNG: drop an image this app or A1111 "
                        f"made.") from exc
    if RECIPE_CHUNK in text:
        return Recipe.from_toml(text[RECIPE_CHUNK], "the PNG's recipe")
    if "parameters" in text:
        return parse_a1111(text["parameters"])
    raise UserError("This PNG carries no generation settings (no sdstudio_recipe or parameters chunk).")


def parse_a1111(text: str) -> Recipe:
    """A1111's parameters text -> a Recipe (prompt, negative, steps, sampler, CFG, seed, size, clip skip)."""
    lines = text.strip().split("\n")
    settings = lines[-1] if len(lines) > 1 and re.search(r"\bSteps: \d+", lines[-1]) else ""
    body = lines[:-1] if settings else lines
    prompt, negative, in_neg = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_neg = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_neg else prompt).append(line)
    fields = dict(m.groups() for m in re.finditer(r"\s*([\w ]+):\s*([^,]+)", settings))
    labels = {v.lower(): k for k, v in SAMPLER_LABELS.items()}
    r = Recipe(prompt="\n".join(prompt).strip(), negative_prompt="\n".join(negative).strip())
    try:
        if "Steps" in fields:
            r.steps = int(fields["Steps"])
        if "CFG scale" in fields:
            r.cfg = float(fields["CFG scale"])
        if "Seed" in fields:
            r.seed = int(fields["Seed"])
        if "Size" in fields:
            r.width, r.height = (int(v) for v in fields["Size"].lower().split("x"))
        if "Clip skip" in fields:
            r.clip_skip = int(fields["Clip skip"])
    except ValueError:
        raise UserError("The PNG's A1111 parameters are garbled: its settings line could not be read.") from None
    r.sampler = labels.get(fields.get("Sampler", "").strip().lower(), r.sampler)
    return r
