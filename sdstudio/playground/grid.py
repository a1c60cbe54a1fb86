"""X/Y grids: vary any two of LoRA weight, a run's checkpoints, CFG, seed, steps and sampler, and lay the
results out as one labelled image. Weight changes go through the stack (no file is read again)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .recipe import Recipe

AXES = {
    "lora_weight": "LoRA weight",  # the weight of [[lora]] item `item`
    "checkpoint": "checkpoint",  # the file of [[lora]] item `item`: a run's checkpoints
    "cfg": "CFG",
    "seed": "seed",
    "steps": "steps",
    "sampler": "sampler",
    "grounding_fraction": "GLIGEN steps",  # how much of the steps the [[grounding]] boxes steer
}


@dataclass
class Axis:
    param: str  # one of AXES
    values: list  # the values along the axis
    item: int = 0  # which [[lora]] item lora_weight / checkpoint change

    def label(self, value) -> str:
        if self.param == "checkpoint":
            return Path(str(value)).parent.name if Path(str(value)).parent.name.startswith("step") else Path(str(value)).stem
        return f"{AXES[self.param]} {value:g}" if isinstance(value, float) else f"{AXES[self.param]} {value}"


def parse_axis(text: str) -> Axis:
    """"cfg=5,7,9", "lora_weight[1]=0,0.5,1", "sampler=euler,ddim", "checkpoint=runs/mylora"."""
    m = re.fullmatch(r"\s*(\w+)(?:\[(\d+)\])?\s*=\s*(.+)", text or "")
    if not m or m[1] not in AXES:
        raise UserError(f"Grid axis {text!r} is not understood: write e.g. cfg=5,7,9 or lora_weight[0]=0,0.5,1 "
                        f"(parameters: {', '.join(AXES)}).")
    param, item = m[1], int(m[2] or 0)
    raw = [v.strip() for v in m[3].split(",") if v.strip()]
    try:
        if param in ("cfg", "lora_weight", "grounding_fraction"):
            values = [float(v) for v in raw]
        elif param in ("seed", "steps"):
            values = [int(v) for v in raw]
        else:
            values = raw
    except ValueError:
        raise UserError(f"Grid axis {param} needs numbers: {m[3]!r} has something else.") from None
    if not values:
        raise UserError(f"Grid axis {param} has no values: list them after '='.")
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
        raise UserError(f"Grid axis {param} has a value that is not a finite number ({m[3]!r}): use plain numbers.")
    if len(values) > 16:
        raise UserError(f"Grid axis {param} has {len(values)} values: use at most 16.")
    return Axis(param, values, item)


def run_checkpoints(run_dir: Path) -> list[Path]:
    """A run's LoRA checkpoints in step order, then its final file(s)."""
    def step_of(p: Path) -> int:
        m = re.search(r"step-(\d+)", str(p))
        return int(m[1]) if m else 1 << 60

    ckpts = sorted((run_dir / "checkpoints").glob("step-*/*.safetensors"), key=step_of)
    ckpts = [p for p in ckpts if "optimizer" not in p.name and "state" not in p.name]
    return ckpts + sorted(run_dir.glob("*.safetensors"))


def expand_checkpoints(axis: Axis, resolve) -> Axis:
    if axis.param != "checkpoint":
        return axis
    files: list[str] = []
    for v in axis.values:
        p = resolve(v)
        files += [str(f) for f in run_checkpoints(p)] if p.is_dir() else [str(p)]
    if not files:
        raise UserError(f"No LoRA checkpoints found in {', '.join(map(str, axis.values))}: point at a run folder "
                        f"with checkpoints/step-N/*.safetensors or at .safetensors files.")
    return Axis("checkpoint", files, axis.item)


def apply_value(recipe: Recipe, axis: Axis, value) -> Recipe:
    if axis.param in ("lora_weight", "checkpoint"):
        if axis.item >= len(recipe.lora):
            raise UserError(f"The grid changes LoRA #{axis.item + 1}, but the recipe has {len(recipe.lora)}: add it "
                            f"to the stack first.")
        items = [it for it in recipe.copy().lora]
        if axis.param == "lora_weight":
            items[axis.item].weight = float(value)
        else:
            items[axis.item].path = str(value)
        return recipe.replace(lora=items)
    return recipe.replace(**{axis.param: value})


def grid_recipes(recipe: Recipe, x: Axis, y: Axis | None) -> list[list[Recipe]]:
    rows = []
    for yv in (y.values if y else [None]):
        base = apply_value(recipe, y, yv) if y else recipe
        rows.append([apply_value(base, x, xv).replace(batch=1) for xv in x.values])
    return rows


def run_grid(session, recipe: Recipe, x: Axis, y: Axis | None = None, *, on_cell=None, check=None, fuse=False):
    """Generate every cell (one image each) and return (grid image, rows of images)."""
    x = expand_checkpoints(x, session.resolve)
    y = expand_checkpoints(y, session.resolve) if y else None
    rows = grid_recipes(recipe, x, y)
    images = []
    done, total = 0, sum(len(r) for r in rows)
    for row in rows:
        out = []
        for cell in row:
            img = session.run(cell, fuse=fuse, check=check)[0]
            out.append(img)
            done += 1
            if on_cell:
                on_cell(done, total, img)
        images.append(out)
    return compose(images, [x.label(v) for v in x.values], [y.label(v) for v in y.values] if y else [""]), images


def compose(rows, x_labels: list[str], y_labels: list[str]):
    """Images in a grid with column labels on top and row labels on the left."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = rows[0][0].size
    try:
        font = ImageFont.load_default(size=max(12, min(w, h) // 10))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = max(draw_probe.textbbox((0, 0), "Ag", font=font)[3] + 8, 16)
    left = max([draw_probe.textbbox((0, 0), t, font=font)[2] for t in y_labels] + [0]) + 12 if any(y_labels) else 0
    top = text_h
    canvas = Image.new("RGB", (left + w * len(x_labels), top + h * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(x_labels):
        tw = draw.textbbox((0, 0), label, font=font)[2]
        draw.text((left + j * w + (w - tw) // 2, 4), label, fill="black", font=font)
    for i, row in enumerate(rows):
        if any(y_labels):
            draw.text((6, top + i * h + h // 2 - text_h // 2), y_labels[i], fill="black", font=font)
        for j, img in enumerate(row):
            canvas.paste(img, (left + j * w, top + i * h))
    return canvas
