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


@dataclass
class RegionItem:
    """A regional prompt (data only here; the regional-attention sampler wires it)."""

    prompt: str = ""
    negative_prompt: str = ""
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)  # x0, y0, x1, y1 as fractions of the image
    t2i_weight: float | None = None  # optional T2I-Adapter strength inside the region
    enabled: bool = True


MAX_SEED = 2**32 - 1  # A1111's range: its seeds and ours mean the same noise bits only within it

ITEM_TABLES = {"lora": LoraItem, "embedding": EmbeddingItem, "controlnet": ControlNetItem,
               "t2i_adapter": T2IAdapterItem, "region": RegionItem}


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
    lora: list[LoraItem] = field(default_factory=list)
    embedding: list[EmbeddingItem] = field(default_factory=list)
    controlnet: list[ControlNetItem] = field(default_factory=list)
    t2i_adapter: list[T2IAdapterItem] = field(default_factory=list)
    region: list[RegionItem] = field(default_factory=list)

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
        return cls.from_toml(path.read_text(encoding="utf-8"), path.name)

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
        for i, r in enumerate(self.region):
            x0, y0, x1, y1 = r.box
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise UserError(f"[[region]] #{i + 1} box {r.box} is not inside the image: use fractions "
                                f"0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1.")


def parse_box(value) -> tuple[float, float, float, float]:
    """A region box from "x0,y0,x1,y1" text or a 4-number list; plain number parsing, never eval."""
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,\s]+", value.strip().strip("()[]")) if p]
    else:
        parts = list(value)
    try:
        nums = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise UserError(f"The region box {value!r} is not four numbers: write it as \"x0,y0,x1,y1\" with fractions "
                        f"like \"0.0,0.0,0.5,1.0\".") from None
    if len(nums) != 4 or not all(math.isfinite(n) for n in nums):
        raise UserError(f"The region box {value!r} needs exactly four numbers: \"x0,y0,x1,y1\".")
    return nums  # type: ignore[return-value]


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
            return parse_box(value)
        if name == "blocks":
            return parse_blocks(value)
        if t.startswith("float") and value is not None:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
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
