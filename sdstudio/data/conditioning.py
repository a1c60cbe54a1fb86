"""Named conditioning that travels with a training image: a control image, a loss mask, grounding boxes.

A method says what it needs with a class attribute, `conditioning = ("control",)` (methods/base.py). The
dataset then finds each name's source for every item (`Condition.locate`), checks them all before any model
loads (`Condition.check`: every bad pair is reported, none is dropped), and reads them with the very cut the
image gets (`Condition.read(source, cut)`: the same cover-resize, centre crop and flip). The loop hands them to
`Method.loss` as `batch.cond[name]`, stacked (B, ...) or, for variable-length things like boxes, a list with one
tensor per item. The latent cache keeps them with the latents.

A new kind of conditioning is one `Condition` subclass and one line in `CONDITIONS`.

Where a control image comes from (the first that exists wins):
  1. metadata.jsonl's `conditioning_image` column (the Hugging Face fill50k convention), relative to that file;
  2. `name.cond.png` beside `name.png`;
  3. a `conditioning/` folder that mirrors `img/`: DS/conditioning/10_sks dog/name.png for DS/img/10_sks dog/
     name.png (what `sdstudio prepare --condition` writes), or F/conditioning/name.png for a plain folder F.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import UserError
from .folder import COND_TAG, mask_path
from .images import IMAGE_EXTS

CONDITIONING_DIR = "conditioning"  # DS/conditioning/ mirrors DS/img/
METADATA_COLUMNS = ("conditioning_image", "conditioning_file_name")  # metadata.jsonl columns, first wins


# -- the cut every conditioning shares with its image -----------------------------------------------------
@dataclass(frozen=True)
class Cut:
    """How an upright image of `size` (w, h) becomes a training sample of `bucket` (w, h): resize to cover the
    bucket, crop to it (centred, or at `shift` for random crops), then flip left-right if asked. `data.dataset` cuts the pixels this way too."""

    size: tuple[int, int]
    bucket: tuple[int, int]
    flip: bool = False
    shift: tuple[float, float] = (0.5, 0.5)  # where the crop sits in the slack, x and y in [0, 1]: 0.5 is centred

    @property
    def scaled(self) -> tuple[int, int]:
        bw, bh = self.bucket
        w, h = self.size
        scale = max(bw / w, bh / h)
        return max(bw, round(w * scale)), max(bh, round(h * scale))

    @property
    def offset(self) -> tuple[int, int]:
        (nw, nh), (bw, bh), (sx, sy) = self.scaled, self.bucket, self.shift
        return int((nw - bw) * sx), int((nh - bh) * sy)

    def image(self, im, resample, size: tuple[int, int] | None = None):
        """Cut a PIL image. `size` (w, h) cuts at another resolution (a mask at latent size): the same
        geometry, scaled."""
        from PIL import Image

        if im.size != self.size:  # e.g. a mask drawn at another size still covers the whole image
            im = im.resize(self.size, resample)
        (nw, nh), (left, top), (bw, bh) = self.scaled, self.offset, self.bucket
        im = im.resize((nw, nh), resample).crop((left, top, left + bw, top + bh))
        if self.flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return im if size is None or im.size == size else im.resize(size, resample)

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left) of the training sample in the resized image, in the flipped image's coordinates when
        flipped: what SDXL's crop micro-conditioning says (diffusers' train_text_to_image_sdxl.py flips, then
        crops)."""
        (nw, _nh), (left, top), (bw, _bh) = self.scaled, self.offset, self.bucket
        return top, (nw - bw - left) if self.flip else left

    def boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes (N, 4) as x0, y0, x1, y1 fractions of the whole image -> fractions of the training sample,
        clipped to it and flipped with it. Boxes left with no area keep their row (zero width or height), so
        the item's count of boxes does not change."""
        (nw, nh), (left, top), (bw, bh) = self.scaled, self.offset, self.bucket
        b = boxes.float().clone()
        b[:, [0, 2]] = ((b[:, [0, 2]] * nw - left) / bw).clamp(0, 1)
        b[:, [1, 3]] = ((b[:, [1, 3]] * nh - top) / bh).clamp(0, 1)
        if self.flip:
            b[:, [0, 2]] = 1 - b[:, [2, 0]]
        return b


def upright_size(path: Path) -> tuple[int, int]:
    """(w, h) of an image as `open_rgb` returns it: EXIF orientations 5-8 swap the sides. Reads the header."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # a broken EXIF block is not our problem here; open_rgb copes with it
            orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


# -- conditions ---------------------------------------------------------------------------------------------
class Condition:
    """One kind of per-item conditioning. Subclass and add it to CONDITIONS.

    `read` returns what the method gets for one item: a tensor (uint8 images become floats in [0, 1]), or, for a
    condition that is not `stacked`, any per-item value (boxes with their phrases, say). Tensors are kept in the
    latent disk cache; anything else is read again when a run resumes from it."""

    name: ClassVar[str]
    label: ClassVar[str]  # what a user calls it, in messages: "condition image"
    required: ClassVar[bool] = True  # an item without a source is an error (else `read(None, cut)` gives a default)
    stacked: ClassVar[bool] = True  # the batch holds one (B, ...) tensor; False: a list, one tensor per item

    def locate(self, layout, image: Path) -> Any:
        """The item's source (a path, a metadata row...), or None when it has none."""
        raise NotImplementedError

    def locate_all(self, layout, images: list[Path]) -> list:
        """`locate` for many images at once (override to share work, e.g. one read of a metadata file)."""
        return [self.locate(layout, p) for p in images]

    def check(self, source, image_size: tuple[int, int]) -> str | None:
        """What is wrong with this source for an image of `image_size`, as a short clause; None when fine."""
        return None

    def read(self, source, cut: Cut) -> torch.Tensor:
        raise NotImplementedError

    def fingerprint(self, source) -> str:
        """What identifies the source's content for the latent disk cache (path and mtime by default)."""
        if isinstance(source, Path):
            try:
                st = source.stat()
                return f"{source}|{st.st_size}|{st.st_mtime_ns}"
            except OSError:
                return str(source)
        return repr(source)


class ControlImage(Condition):
    """A control image (edges, depth, pose...): RGB uint8 (3, H, W) at the image's training size. uint8 keeps
    the latent cache small; the loop turns it into floats in [0, 1], what ControlNets and T2I-Adapters take."""

    name = "control"
    label = "condition image"

    def locate(self, layout, image: Path) -> Path | None:
        return find_condition(layout, image)

    def locate_all(self, layout, images: list[Path]) -> list:
        cache: dict = {}  # each metadata.jsonl is read once, not once per image
        return [find_condition(layout, p, cache) for p in images]

    def check(self, source, image_size):
        from PIL import Image

        try:
            size = upright_size(source)
            with Image.open(source) as im:
                im.verify()  # reads the whole file: a truncated or corrupt one fails here, not at step 1000
        except Exception:
            return f"its condition {source.name} is not a readable image"
        if size != tuple(image_size):
            return (f"its condition {source.name} is {size[0]}x{size[1]} but the image is "
                    f"{image_size[0]}x{image_size[1]}")
        return None

    def read(self, source, cut):
        from PIL import Image

        from .images import open_rgb

        im = cut.image(open_rgb(source), Image.Resampling.BILINEAR)  # bilinear, as diffusers' train_controlnet
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class LossMask(Condition):
    """The loss mask in latent space, (1, H/8, W/8) in [0, 1]: the share of each latent cell inside the white
    part of `name.mask.png`. All ones when an image has none."""

    name = "mask"
    label = "loss mask"
    required = False

    def locate(self, layout, image: Path) -> Path | None:
        return mask_path(image)

    def check(self, source, image_size):
        from PIL import Image

        try:
            with Image.open(source) as im:
                im.verify()
        except Exception:
            return f"its mask {source.name} is not a readable image"
        return None

    def read(self, source, cut):
        from PIL import Image

        bw, bh = cut.bucket
        if source is None:
            return torch.ones(1, bh // 8, bw // 8)
        with Image.open(source) as m:
            m = cut.image(m.convert("L"), Image.Resampling.BILINEAR)
        m = m.resize((bw // 8, bh // 8), Image.Resampling.BOX)  # the share of each latent cell inside the mask
        return torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)[None]


class GroundingBoxes(Condition):
    """GLIGEN's grounding objects from the dataset's boxes.jsonl (data/boxes.py): each item's boxes cut with its
    image, as {"boxes": (30, 4) x0, y0, x1, y1 fractions of the sample, "masks": (30,) 1 for a real box,
    "phrases": [one per slot in use]}. A box the crop cut away (under 1% of the sample on a side) keeps its slot
    with mask 0, as padding has. An image without a line in the file has no objects (all masks 0)."""

    name = "boxes"
    label = "box file"
    required = False
    stacked = False  # phrases are text: the batch holds each item's dict

    def locate_all(self, layout, images: list[Path]) -> list:
        from .boxes import FILE, boxes_file, objects_for, read_boxes

        path = boxes_file(layout.root)
        if path is None:
            raise UserError(f"{Path(layout.root).name} has no {FILE}: draw boxes in the Dataset tab (Boxes), or write "
                            f"{FILE} beside img/ with one line per image, before training GLIGEN.")
        table = read_boxes(path)  # a box outside [0, 1] or of zero area is one sentence naming its line
        found = [tuple(objects_for(table, p, path.parent)) for p in images]
        if images and not any(found):
            raise UserError(f"{path.name} names none of the {len(images)} images of {Path(layout.root).name}: its "
                            f"file_name entries must be paths relative to {path.parent.name}/ (e.g. "
                            f"img/10_dog/0001.png).")
        return found

    def locate(self, layout, image: Path):
        return self.locate_all(layout, [image])[0]

    def read(self, source, cut):
        from .boxes import MAX_OBJECTS, MIN_SIDE

        objects = list(source or ())[:MAX_OBJECTS]
        boxes, masks = torch.zeros(MAX_OBJECTS, 4), torch.zeros(MAX_OBJECTS)
        if objects:
            b = cut.boxes(torch.tensor([o.box for o in objects], dtype=torch.float32))
            n = len(objects)
            boxes[:n] = b
            masks[:n] = (((b[:, 2] - b[:, 0]) >= MIN_SIDE) & ((b[:, 3] - b[:, 1]) >= MIN_SIDE)).float()
        return {"boxes": boxes, "masks": masks, "phrases": [o.phrase for o in objects]}



class TimeIds(Condition):
    """SDXL's micro-conditioning (Podell et al. 2023, 2.2), float (6,): original height and width, crop top and
    left, target height and width, in pixels, as the UNet's added `time_ids` take them. The original size is the
    image's own (upright); the crop is where the bucket's sample sits in the cover-resized image; the target is the
    bucket. The loop adds it on SDXL bases; it needs no file."""

    name = "time_ids"
    label = "size conditioning"
    required = False

    def locate(self, layout, image: Path) -> None:
        return None

    def read(self, source, cut):
        (w, h), (top, left), (bw, bh) = cut.size, cut.crop_top_left, cut.bucket
        return torch.tensor([h, w, top, left, bh, bw], dtype=torch.float32)

    def fingerprint(self, source) -> str:
        return "time_ids"  # a pure function of the cut, which the latent key already names


CONDITIONS: dict[str, Condition] = {c.name: c for c in (ControlImage(), LossMask(), GroundingBoxes(), TimeIds())}


def get_condition(name: str) -> Condition:
    try:
        return CONDITIONS[name]
    except KeyError:
        raise UserError(f"Unknown conditioning {name!r}: the dataset can read {', '.join(CONDITIONS)}.") from None


def to_batch(cond: Condition, values: list, device) -> "torch.Tensor | list":
    """What `batch.cond[name]` holds: uint8 images become floats in [0, 1]; one (B, ...) tensor when the condition
    is stacked, else a list with each item's value (tensors moved to the device)."""
    values = [v.float() / 255.0 if isinstance(v, torch.Tensor) and v.dtype == torch.uint8 else v for v in values]
    if cond.stacked:
        return torch.stack(values).to(device)
    return [v.to(device) if isinstance(v, torch.Tensor) else v for v in values]


# -- where a control image is ---------------------------------------------------------------------------------
def image_root(layout) -> Path:
    """The folder the images hang under: DS/img for a prepared dataset, else the dataset folder."""
    root = Path(layout.root)
    return root / "img" if (root / "img").is_dir() else root


def _with_any_ext(stem_path: Path) -> Path | None:
    for ext in IMAGE_EXTS:
        for p in (stem_path.with_name(stem_path.name + ext), stem_path.with_name(stem_path.name + ext.upper())):
            if p.is_file():
                return p
    return None


def _metadata_conditions(folder: Path, cache: dict) -> dict[str, Path]:
    """{image file name: condition path} from folder/metadata.jsonl's conditioning column (memoised)."""
    if folder in cache:
        return cache[folder]
    out: dict[str, Path] = {}
    p = folder / "metadata.jsonl"
    if p.is_file():
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict) or not row.get("file_name"):
                continue
            col = next((row[c] for c in METADATA_COLUMNS if row.get(c)), None)
            if isinstance(col, str):
                out[(folder / row["file_name"]).resolve().as_posix()] = folder / col
    cache[folder] = out
    return out


def find_condition(layout, image: Path, _cache: dict | None = None) -> Path | None:
    """The control image that goes with `image` (see the module's docstring for the three conventions)."""
    cache = _cache if _cache is not None else {}
    image = Path(image)
    root = Path(layout.root)
    # 1. metadata.jsonl beside the image, or at the dataset root
    for folder in dict.fromkeys((image.parent, root)):
        hit = _metadata_conditions(folder, cache).get(image.resolve().as_posix())
        if hit is not None:
            return hit
    # 2. name.cond.png beside name.png
    beside = _with_any_ext(image.with_name(image.stem + COND_TAG))
    if beside is not None:
        return beside
    # 3. conditioning/ mirroring img/ (DS/conditioning next to DS/img, or inside a plain folder)
    iroot = image_root(layout)
    try:
        rel = image.relative_to(iroot)
    except ValueError:
        return None
    for croot in (iroot.parent / CONDITIONING_DIR, iroot / CONDITIONING_DIR):
        hit = _with_any_ext((croot / rel).with_suffix(""))
        if hit is not None:
            return hit
    return None


def condition_dir(dataset: Path, concept_folder: str) -> Path:
    """Where `sdstudio prepare --condition` writes the control images of one concept folder."""
    return Path(dataset) / CONDITIONING_DIR / concept_folder


# -- reporting pairs ---------------------------------------------------------------------------------------
@dataclass
class Pair:
    """An image, its control image (or None) and what is wrong with the pair ("" when it is fine)."""

    image: Path
    condition: Path | None
    problem: str = ""


def check_pairs(layout, images: list[Path] | None = None) -> list[Pair]:
    """Every image of the dataset with its control image and problem: missing, unreadable, another size."""
    cond = CONDITIONS["control"]
    images = list(images if images is not None else layout.images)
    out = []
    for p, src in zip(images, cond.locate_all(layout, images)):
        if src is None:
            out.append(Pair(p, None, "has no condition image"))
            continue
        try:
            size = upright_size(p)
        except Exception:
            out.append(Pair(p, src, "is not a readable image"))
            continue
        out.append(Pair(p, src, cond.check(src, size) or ""))
    return out


def problems_sentence(bad: list[tuple[Path, str]], total: int, what: str = "condition image") -> str:
    """One sentence naming every bad pair (up to 12, then a count) and what to do."""
    shown = "; ".join(f"{p.parent.name}/{p.name} {why}" for p, why in bad[:12])
    more = f"; and {len(bad) - 12} more" if len(bad) > 12 else ""
    if what != "condition image":
        return f"{len(bad)} of {total} images have an unusable {what} ({shown}{more}): fix or remove those files."
    return (f"{len(bad)} of {total} images have no usable condition image ({shown}{more}): give each image one of "
            f"its own size (name.cond.png beside it, a conditioning/ folder mirroring img/, or a conditioning_image "
            f"column in metadata.jsonl), make them with `sdstudio prepare --condition canny`, or remove those "
            f"images.")
