"""A Playground recipe: base model + prompt + sampler settings + a stack of items, as plain data.

It round-trips through TOML (`sdstudio generate RECIPE.toml`) and rides along in every PNG we write. The schema
is a contract scripts rely on: extend it, never break it. Unknown keys are an error, so a typo never passes
silently.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import UserError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib


@dataclass
class LoraItem:
    """A LoRA / LoCon / LoHa / LoKr file; the kind is detected from its keys."""

    path: str
    weight: float = 1.0  # strength on the UNet (A1111's multiplier)
    text_encoder_weight: float | None = None  # strength on the text encoder(s); None = same as weight
    blocks: list[float] = field(default_factory=list)  # LoRA-Block-Weight list (17/26 for SD1.x, 12/20 SDXL)
    start: float = 0.0  # active from this fraction of the steps...
    end: float = 1.0  # ...up to this fraction
    enabled: bool = True  # off = as if absent, but stays loaded


@dataclass
class EmbeddingItem:
    """A textual-inversion embedding; `token` is what the prompt uses to call it."""

    path: str
    token: str = ""  # empty = the file name in angle brackets, e.g. <sks>
    enabled: bool = True


@dataclass
class ControlNetItem:
    path: str  # a diffusers ControlNet folder
    image: str = ""  # the control image (or the photo a preprocessor turns into one)
    preprocessor: str = "none"  # none, canny, lineart, shuffle, hed, mlsd, depth, openpose
    weight: float = 1.0  # conditioning scale
    start: float = 0.0  # guidance start, as a fraction of the steps
    end: float = 1.0  # guidance end
    enabled: bool = True


@dataclass
class T2IAdapterItem:
    path: str  # a diffusers T2I-Adapter folder
    image: str = ""
    preprocessor: str = "none"
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    enabled: bool = True


BOX_FORMATS = ("fractions", "mixofshow")


@dataclass
class RegionItem:
    """A regional prompt (data only here; the regional-attention sampler wires it).

    `box` is kept as the user wrote it, in `box_format`:
      - "fractions": (left, top, right, bottom) as fractions 0..1 of the image (x0, y0, x1, y1);
      - "mixofshow": [top, left, bottom, right] in pixels of the image, as Mix-of-Show's regionally_sample.sh
        writes them (an empty [] is the whole image). `box = "mixofshow: [12, 36, 1024, 600]"` says the same.
    `fractions(width, height)` gives the box the sampler uses."""

    prompt: str = ""
    negative_prompt: str = ""
    box: tuple[float, ...] = (0.0, 0.0, 1.0, 1.0)
    box_format: str = "fractions"
    t2i_weight: float | None = None  # optional T2I-Adapter strength inside the region
    enabled: bool = True

    def fractions(self, width: int, height: int) -> tuple[float, float, float, float]:
        return box_to_fractions(self.box, self.box_format, width, height)


def box_to_fractions(box, box_format: str, width: int, height: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) fractions of a `width` x `height` image from a box in `box_format`; one
    sentence when it does not fit."""
    nums = tuple(float(v) for v in box)
    if box_format == "mixofshow":
        if not nums:
            return 0.0, 0.0, 1.0, 1.0  # Mix-of-Show: an empty box is the whole image
        if len(nums) != 4:
            raise UserError(f"The Mix-of-Show region box {list(box)} needs four pixel numbers: [top, left, bottom, "
                            f"right], e.g. [0, 0, {height}, {width // 2}].")
        top, left, bottom, right = nums
        if not (0 <= top < bottom <= height and 0 <= left < right <= width):
            raise UserError(f"The Mix-of-Show region box {list(box)} ([top, left, bottom, right] in pixels) is not "
                            f"inside the {width}x{height} image: use 0 <= top < bottom <= {height} and 0 <= left < "
                            f"right <= {width}.")
        return left / width, top / height, right / width, bottom / height
    if box_format != "fractions":
        raise UserError(f"box_format = {box_format!r} is not known: use \"fractions\" (left, top, right, bottom in "
                        "0..1) or \"mixofshow\" ([top, left, bottom, right] in pixels).")
    if len(nums) != 4:
        raise UserError(f"The region box {list(box)} needs exactly four numbers: \"x0,y0,x1,y1\".")
    x0, y0, x1, y1 = nums
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        hint = (" These look like pixels: for Mix-of-Show's [top, left, bottom, right] pixel boxes set box_format = "
                "\"mixofshow\" (or write box = \"mixofshow: [...]\")." if max(nums) > 1 else "")
        raise UserError(f"The region box {tuple(box)} is not inside the image: use fractions 0 <= x0 < x1 <= 1 and "
                        f"0 <= y0 < y1 <= 1 (left, top, right, bottom).{hint}")
    return x0, y0, x1, y1


@dataclass
class GroundingItem:
    """A GLIGEN object: a phrase placed in a box (playground/gligen.py)."""

    phrase: str = ""
    box: tuple[float, float, float, float] = (0.25, 0.25, 0.75, 0.75)  # x0, y0, x1, y1 as fractions of the image
    enabled: bool = True


MAX_SEED = 2**32 - 1  # A1111's range: its seeds and ours mean the same noise bits only within it

ITEM_TABLES = {"lora": LoraItem, "embedding": EmbeddingItem, "controlnet": ControlNetItem,
               "t2i_adapter": T2IAdapterItem, "region": RegionItem, "grounding": GroundingItem}


@dataclass
class Recipe:
    base_model: str = "tiny"  # "tiny" | hub id | local folder | single file
    prompt: str = ""
    negative_prompt: str = ""
    sampler: str = "dpm++2m_karras"  # see pipeline.SAMPLERS
    steps: int = 20
    cfg: float = 7.0
    seed: int = 1  # image i of a batch uses seed + i, so each image is reproducible alone; -1 = draw one
    width: int = 512
    height: int = 512
    batch: int = 1
    clip_skip: int = 1  # 2 = A1111's "CLIP skip 2" (penultimate text-encoder layer)
    init_image: str = ""  # img2img / inpaint source image; empty = txt2img
    mask_image: str = ""  # inpaint mask (white = repaint); needs init_image
    strength: float = 0.75  # img2img denoising strength
    gligen: str = ""  # a GLIGEN module file applied to the base; empty = the base's own gated layers
    vae: str = ""  # a VAE file (models/vae) decoding in place of the base's own, as A1111's "SD VAE"; empty = own
    grounding_fraction: float = 0.3  # GLIGEN's scheduled sampling: boxes steer this first part of the steps
    lora: list[LoraItem] = field(default_factory=list)
    embedding: list[EmbeddingItem] = field(default_factory=list)
    controlnet: list[ControlNetItem] = field(default_factory=list)
    t2i_adapter: list[T2IAdapterItem] = field(default_factory=list)
    region: list[RegionItem] = field(default_factory=list)
    grounding: list[GroundingItem] = field(default_factory=list)

    # -- conversions ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain data for TOML; None values are left out (TOML has no null)."""
        data = _drop_none(dataclasses.asdict(self))
        for table in ITEM_TABLES:  # an empty [[table]] list is noise in a hand-edited file
            if not data[table]:
                del data[table]
        return data

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict, where: str = "recipe") -> "Recipe":
        data = dict(data)
        items = {}
        for table, item_cls in ITEM_TABLES.items():
            raw = data.pop(table, [])
            if isinstance(raw, dict):
                raw = [raw]
            if not isinstance(raw, list):
                raise UserError(f"In {where}, [[{table}]] must be a list of tables: write each item as [[{table}]].")
            if table == "region":
                raw = [_region_box_prefix(dict(it), f"{where} [[region]] #{i + 1}") if isinstance(it, dict) else it
                       for i, it in enumerate(raw)]
            items[table] = [_build(item_cls, dict(it), f"{where} [[{table}]] #{i + 1}") for i, it in enumerate(raw)]
        recipe = _build(cls, data, where)
        for table, value in items.items():
            setattr(recipe, table, value)
        recipe.validate()
        return recipe

    @classmethod
    def from_toml(cls, text: str, where: str = "recipe") -> "Recipe":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{where} is not valid TOML ({exc}): fix the line it names.") from exc
        return cls.from_dict(data, where)

    @classmethod
    def load(cls, path: Path | str) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"The recipe {path} does not exist: check the path.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path.name} is not a text file (it is not UTF-8): give a recipe .toml.") from None
        return cls.from_toml(text, path.name)

    def save(self, path: Path | str) -> Path:
        from ..formats.safe_io import atomic_write_text

        return atomic_write_text(path, self.to_toml())

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self.copy(), **changes)

    def copy(self) -> "Recipe":
        return Recipe.from_dict(self.to_dict())

    # -- checks --------------------------------------------------------------------------------------
    def with_seed(self) -> "Recipe":
        """The recipe to generate: seed -1 (A1111's "random") draws a seed now, so that the PNG and the recipe
        record the seed that really made the image and it can be made again."""
        if self.seed >= 0:
            return self
        import secrets

        return self.replace(seed=secrets.randbelow(MAX_SEED - 64))  # room for seed + i in a batch

    def validate(self) -> None:
        """Bounds a user can get wrong, each with one sentence saying how to fix it."""
        _check_finite(self)
        if self.seed < -1 or self.seed > MAX_SEED:
            raise UserError(f"seed = {self.seed} is out of range: use 0 to {MAX_SEED}, or -1 for a random one.")
        if self.steps < 1 or self.steps > 1000:
            raise UserError(f"steps = {self.steps} is out of range: use 1 to 1000.")
        if self.batch < 1 or self.batch > 64:
            raise UserError(f"batch = {self.batch} is out of range: use 1 to 64.")
        if not (math.isfinite(self.cfg) and 0 <= self.cfg <= 50):
            raise UserError(f"cfg = {self.cfg} is out of range: use 0 to 50 (7 is typical).")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v < 64 or v > 4096 or v % 8:
                raise UserError(f"{name} = {v} must be a multiple of 8 between 64 and 4096.")
        if self.clip_skip < 1 or self.clip_skip > 12:
            raise UserError(f"clip_skip = {self.clip_skip} is out of range: use 1 (none) to 12.")
        if not 0 < self.strength <= 1:
            raise UserError(f"strength = {self.strength} must be above 0 and at most 1.")
        if self.mask_image and not self.init_image:
            raise UserError("mask_image is set but init_image is not: inpainting needs the image to paint into.")
        for table in ("lora", "controlnet", "t2i_adapter"):
            for i, it in enumerate(getattr(self, table)):
                where = f"[[{table}]] #{i + 1} ({Path(it.path).name})"
                for wname in ("weight", "text_encoder_weight"):
                    w = getattr(it, wname, None)
                    if w is not None and not (math.isfinite(w) and -20 <= w <= 20):
                        raise UserError(f"{where} has {wname} = {w}: use a number between -20 and 20.")
                if not (0 <= it.start < it.end <= 1):
                    raise UserError(f"{where} has start = {it.start}, end = {it.end}: use 0 <= start < end <= 1.")
                if table == "lora" and any(not math.isfinite(b) for b in it.blocks):
                    raise UserError(f"{where} has a block weight that is not a number: use plain numbers.")
        if not (math.isfinite(self.grounding_fraction) and 0 <= self.grounding_fraction <= 1):
            raise UserError(f"grounding_fraction = {self.grounding_fraction} is out of range: use 0 (no grounding) "
                            f"to 1 (every step).")
        if len(self.grounding) > 30:
            raise UserError(f"{len(self.grounding)} [[grounding]] boxes: GLIGEN places at most 30; remove some.")
        for i, g in enumerate(self.grounding):
            where = f"[[grounding]] #{i + 1}"
            if not g.phrase.strip():
                raise UserError(f"{where} has no phrase: say what belongs in its box, e.g. phrase = \"a red car\".")
            x0, y0, x1, y1 = g.box
            if not all(0 <= v <= 1 for v in g.box):
                raise UserError(f"{where} ({g.phrase!r}) has box {list(g.box)} outside the image: use fractions from 0 "
                                f"to 1 as [x0, y0, x1, y1].")
            if not (x0 < x1 and y0 < y1):
                raise UserError(f"{where} ({g.phrase!r}) has box {list(g.box)} with zero area: x1 must be above x0 and "
                                f"y1 above y0.")
        for i, r in enumerate(self.region):
            try:
                r.fractions(self.width, self.height)
            except UserError as exc:
                raise UserError(f"[[region]] #{i + 1}: {exc}") from None


def split_box_format(value) -> tuple[str | None, object]:
    """`"mixofshow: [12, 36, 1024, 600]"` -> ("mixofshow", "[12, 36, 1024, 600]"); other values -> (None, value)."""
    if isinstance(value, str):
        head, sep, rest = value.partition(":")
        if sep and head.strip().lower() in BOX_FORMATS:
            return head.strip().lower(), rest
    return None, value


def parse_box(value, allow_empty: bool = False, what: str = "region box") -> tuple[float, ...]:
    """A region or grounding box from "x0,y0,x1,y1" text or a 4-number list; plain number parsing, never eval."""
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,\s]+", value.strip().strip("()[]")) if p]
    else:
        parts = list(value)
    try:
        nums = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise UserError(f"The {what} {value!r} is not four numbers: write it as \"x0,y0,x1,y1\" with fractions "
                        f"like \"0.0,0.0,0.5,1.0\".") from None
    if (len(nums) != 4 and not (allow_empty and not nums)) or not all(math.isfinite(n) for n in nums):
        raise UserError(f"The {what} {value!r} needs exactly four numbers: \"x0,y0,x1,y1\".")
    return nums


def parse_blocks(value) -> list[float]:
    """Block weights from "1,0,0.5,..." text or a list."""
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,\s]+", value.strip()) if p]
    else:
        parts = list(value or [])
    try:
        return [float(p) for p in parts]
    except (TypeError, ValueError):
        raise UserError(f"The block weights {value!r} are not numbers: write them as \"1,0,0,1,...\".") from None


def _check_finite(recipe: "Recipe") -> None:
    """No NaN or infinity anywhere: top-level numbers, every item's numbers, block weights and boxes. A recipe
    built from UI values (sliders) never went through `_coerce`, so this sweep is what guards it."""
    def bad(v) -> bool:
        return isinstance(v, float) and not math.isfinite(v)

    for f in fields(recipe):
        v = getattr(recipe, f.name)
        if bad(v):
            raise UserError(f"{f.name} = {v} is not a finite number: use a plain number.")
    for table in ITEM_TABLES:
        for i, item in enumerate(getattr(recipe, table)):
            for f in fields(item):
                v = getattr(item, f.name)
                values = v if isinstance(v, (list, tuple)) else [v]
                if any(bad(x) for x in values):
                    raise UserError(f"[[{table}]] #{i + 1} has {f.name} = {v}, which is not a finite number: use plain "
                                    f"numbers.")


def _region_box_prefix(it: dict, where: str) -> dict:
    """`box = "mixofshow: [...]"` sets box_format; a prefix that contradicts an explicit box_format is an error."""
    fmt, rest = split_box_format(it.get("box"))
    if fmt is None:
        return it
    if it.get("box_format", fmt) != fmt:
        raise UserError(f"{where} has box = {it['box']!r} but box_format = {it['box_format']!r}: keep one of them.")
    return {**it, "box": rest, "box_format": fmt}


def _drop_none(obj):
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_drop_none(v) for v in obj]
    return obj


def _build(cls, data: dict, where: str):
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise UserError(f"{where} has unknown key(s) {', '.join(unknown)}: check the spelling "
                        f"(known: {', '.join(n for n in names if n not in ITEM_TABLES)}).")
    if "path" in names and not str(data.get("path", "")).strip():
        raise UserError(f"{where} has no path: add path = \"models/...\".")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(name, value, names[name], where)
    return cls(**kwargs)


def _coerce(name, value, f, where):
    t = str(f.type)
    try:
        if name == "box":
            grounding = "[[grounding]]" in where  # a region box may be empty (Mix-of-Show: the whole image)
            return parse_box(value, allow_empty=not grounding, what="grounding box" if grounding else "region box")
        if name == "box_format" and value not in BOX_FORMATS:
            raise UserError(f"In {where}, box_format = {value!r} is not known: use \"fractions\" (left, top, right, "
                            "bottom in 0..1) or \"mixofshow\" ([top, left, bottom, right] in pixels).")
        if name == "blocks":
            return parse_blocks(value)
        if t.startswith("float") and value is not None:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise UserError(f"In {where}, {name} = {value!r} is not a finite number: use a plain number.")
            return number
        if t == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if t == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if t == "str":
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        raise UserError(f"In {where}, {name} = {value!r} has the wrong type: expected {t.split(' ')[0]}.") from None
    return value
