"""X/Y grids: vary any two of LoRA weight, a run's checkpoints, CFG, seed, steps and sampler, and lay the
results out as one labelled image. Weight changes go through the stack (no file is read again)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .recipe import Recipe

_NUMBERED = re.compile(r"-(\d{6})$")  # name-000020: a numbered save (formats/numbered.py)

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
        """The value as a column or row header: short, because the axis title names what varies."""
        if self.param == "checkpoint":
            p = Path(str(value))
            m = _NUMBERED.search(p.stem)
            return p.parent.name if p.parent.name.startswith("step") else (f"step {int(m[1])}" if m else p.stem)
        return f"{value:g}" if isinstance(value, float) else str(value)

    def title(self, recipe: Recipe | None = None) -> str:
        """What the axis varies, naming the item: "LoRA weight of mira-woman", "CFG"."""
        name = AXES[self.param]
        if self.param in ("lora_weight", "checkpoint") and recipe is not None and self.item < len(recipe.lora):
            what = Path(str(recipe.lora[self.item].path)).stem
            return f"{name} of {what}" if self.param == "lora_weight" else f"{what}: {name}"
        return name


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
    # A resumable checkpoint's own tensors (trainable, ema) are training state, not a file the Playground loads.
    ckpts = [p for p in ckpts if p.stem not in ("trainable", "ema") and "optimizer" not in p.name
             and "state" not in p.name]
    files = sorted(run_dir.glob("*.safetensors"))
    numbered = sorted((p for p in files if _NUMBERED.search(p.stem)), key=lambda p: int(_NUMBERED.search(p.stem)[1]))
    return ckpts + numbered + [p for p in files if p not in numbered]


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
    return compose(images, [x.label(v) for v in x.values], [y.label(v) for v in y.values] if y else [""],
                   x_title=x.title(recipe), y_title=y.title(recipe) if y else ""), images


# Headers are drawn at this size whatever the cell size, as A1111's grids are; cells narrower than their
# headers are enlarged (nearest neighbour, so pixels stay honest) until each header fits its column.
FONT_PX = 16
MAX_UPSCALE = 4
MAX_LEFT_PX = 260  # row headers wrap to this width (a long prompt takes several lines)


@dataclass
class GridLayout:
    """Where everything of a grid goes: the cell size after enlarging, and each text with its box."""

    cell: tuple[int, int]
    size: tuple[int, int]
    left: int
    top: int
    font_px: int
    texts: list  # (x, y, text, (x0, y0, x1, y1)): a header's lines and the box it must stay inside


def _font(px: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """Words over as many lines as needed to fit `width`; a word wider than that is cut with an ellipsis."""
    lines: list[str] = []
    for word in text.split() or [""]:
        if lines and draw.textlength(lines[-1] + " " + word, font=font) <= width:
            lines[-1] += " " + word
            continue
        while draw.textlength(word, font=font) > width and len(word) > 1:
            word = word[:-2] + "…" if word.endswith("…") else word[:-1] + "…"
        lines.append(word)
    return lines


def grid_layout(cell: tuple[int, int], cols: int, rows: int, x_labels: list[str], y_labels: list[str],
                x_title: str = "", y_title: str = "") -> GridLayout:
    from PIL import Image, ImageDraw

    font = _font(FONT_PX)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(FONT_PX * 1.3)
    pad = 6
    w, h = cell
    widest = max([draw.textlength(t, font=font) for t in x_labels] + [1])
    k = 1
    while w * k < widest + 2 * pad and k < MAX_UPSCALE:
        k += 1
    w, h = w * k, h * k
    has_y = any(y_labels) or bool(y_title)
    left = 0
    if has_y:
        want = max([draw.textlength(t, font=font) for t in [*y_labels, y_title]] + [0]) + 2 * pad
        left = int(min(MAX_LEFT_PX, max(64, want)))
    texts = []
    y = pad
    if x_title:
        for line in _wrap(draw, x_title, font, w * cols - 2 * pad):
            tw = draw.textlength(line, font=font)
            texts.append((left + (w * cols - tw) / 2, y, line, (left, 0, left + w * cols, y + line_h)))
            y += line_h
    x_lines = [_wrap(draw, t, font, w - 2 * pad) for t in x_labels]
    top = y + line_h * max([len(ls) for ls in x_lines] + [1]) + pad
    for j, lines in enumerate(x_lines):
        for n, line in enumerate(lines):
            tw = draw.textlength(line, font=font)
            box = (left + j * w, y, left + (j + 1) * w, top)
            texts.append((left + j * w + (w - tw) / 2, y + n * line_h, line, box))
    if y_title:
        for n, line in enumerate(_wrap(draw, y_title, font, left - 2 * pad)):
            texts.append((pad, pad + n * line_h, line, (0, 0, left, top)))
    for i, label in enumerate(y_labels if has_y else []):
        lines = _wrap(draw, label, font, left - 2 * pad)[: max(1, (h - pad) // line_h)]
        y0 = top + i * h + max(pad, (h - line_h * len(lines)) // 2)
        for n, line in enumerate(lines):
            texts.append((pad, y0 + n * line_h, line, (0, top + i * h, left, top + (i + 1) * h)))
    return GridLayout(cell=(w, h), size=(left + w * cols, top + h * rows), left=left, top=top, font_px=FONT_PX,
                      texts=texts)


def compose(rows, x_labels: list[str], y_labels: list[str], *, x_title: str = "", y_title: str = ""):
    """Images in a grid: the axis titles (what varies, naming the item), each column's value on top and each row's
    on the left, at a readable size whatever the cell size."""
    from PIL import Image, ImageDraw

    w, h = rows[0][0].size
    lay = grid_layout((w, h), len(x_labels), len(rows), x_labels, y_labels, x_title, y_title)
    canvas = Image.new("RGB", lay.size, "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(lay.font_px)
    for x, y, text, _box in lay.texts:
        draw.text((x, y), text, fill="black", font=font)
    cw, ch = lay.cell
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            if img.size != (cw, ch):
                img = img.resize((cw, ch), Image.Resampling.NEAREST)
            canvas.paste(img, (lay.left + j * cw, lay.top + i * ch))
    return canvas
