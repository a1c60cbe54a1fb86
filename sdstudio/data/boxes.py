"""Grounding boxes of a dataset: `boxes.jsonl` in the dataset folder, one line per image, for GLIGEN training.

    {"file_name": "img/10_sks dog/0001.png", "objects": [{"phrase": "a dog", "box": [0.12, 0.3, 0.58, 0.95]}]}

- `file_name` is relative to the folder that holds boxes.jsonl (the dataset folder); a bare file name works when
  it names one image only.
- `box` is (x0, y0, x1, y1) as fractions of the image as it is on disk, before any training crop; at most 30
  objects per image (the position net's slots). A line may also hold one object at the top level
  (`{"file_name": ..., "phrase": ..., "box": ...}`): lines of the same image add up.
- Written by the Dataset tab's box editor (faces can be pre-filled from the face detector); read by training,
  which cuts the boxes with the image (`crop_objects`) and pads them into tensors (`padded`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

FILE = "boxes.jsonl"
MAX_OBJECTS = 30
MIN_SIDE = 0.01  # a box thinner than 1% of the image after a crop is dropped


@dataclass(frozen=True)
class GroundedObject:
    phrase: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the image

    def to_dict(self) -> dict:
        return {"phrase": self.phrase, "box": [round(v, 5) for v in self.box]}


def check_object(phrase, box, where: str) -> GroundedObject:
    """One object from user data; one sentence when it is wrong."""
    if not isinstance(phrase, str) or not phrase.strip():
        raise UserError(f"{where} has an object without a phrase: write what is in the box.")
    try:
        nums = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        nums = ()
    if len(nums) != 4 or not all(math.isfinite(v) for v in nums):
        raise UserError(f"{where}: the box of {phrase!r} is not four numbers [x0, y0, x1, y1].")
    if not all(0 <= v <= 1 for v in nums):
        raise UserError(f"{where}: the box of {phrase!r} {list(nums)} goes outside the image: use fractions 0 to 1.")
    x0, y0, x1, y1 = nums
    if not (x0 < x1 and y0 < y1):
        raise UserError(f"{where}: the box of {phrase!r} {list(nums)} has zero area: x1 must be above x0, y1 above y0.")
    return GroundedObject(phrase.strip(), nums)  # type: ignore[arg-type]


def boxes_file(root: Path | str) -> Path | None:
    """The boxes.jsonl of a dataset, looked for where the user may point: the dataset folder or its img/ folder."""
    root = Path(root)
    for folder in (root, root.parent if root.name == "img" else None):
        if folder is not None and (folder / FILE).is_file():
            return folder / FILE
    return None


def read_boxes(path: Path | str) -> dict[str, list[GroundedObject]]:
    """{file_name: objects} from a boxes.jsonl; a broken line is one sentence naming its number."""
    path = Path(path)
    table: dict[str, list[GroundedObject]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where} is not valid JSON ({exc.msg}): fix or delete that line.") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not row["file_name"].strip():
            raise UserError(f"{where} has no file_name: each line names its image.")
        objects = row.get("objects", [])
        if "phrase" in row or "box" in row:
            objects = [*objects, {"phrase": row.get("phrase"), "box": row.get("box")}]
        if not isinstance(objects, list):
            raise UserError(f"{where}: objects must be a list of {{\"phrase\": ..., \"box\": [...]}}.")
        got = table.setdefault(Path(row["file_name"]).as_posix(), [])
        for obj in objects:
            if not isinstance(obj, dict):
                raise UserError(f"{where}: each object is {{\"phrase\": ..., \"box\": [x0, y0, x1, y1]}}.")
            got.append(check_object(obj.get("phrase"), obj.get("box"), where))
        if len(got) > MAX_OBJECTS:
            raise UserError(f"{where}: {row['file_name']} has {len(got)} objects; GLIGEN takes at most {MAX_OBJECTS}.")
    return table


def write_boxes(path: Path | str, table: dict[str, list[GroundedObject]]) -> Path:
    """Write boxes.jsonl atomically, one line per image that has objects, in file-name order."""
    from ..formats.safe_io import atomic_write_text

    lines = [json.dumps({"file_name": name, "objects": [o.to_dict() for o in objs]}, ensure_ascii=False)
             for name, objs in sorted(table.items()) if objs]
    return atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def objects_for(table: dict[str, list[GroundedObject]], image: Path, root: Path) -> list[GroundedObject]:
    """The objects of `image` (a path under `root`, the folder of boxes.jsonl)."""
    try:
        rel = image.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        rel = image.name
    if rel in table:
        return table[rel]
    bare = [k for k in table if "/" not in k and k == image.name]
    return table[bare[0]] if bare else []


def faces_as_objects(image, phrase: str = "a face") -> list[GroundedObject]:
    """Boxes for the faces the face detector finds in a PIL image (largest first), as objects."""
    from .crop import detect_faces

    w, h = image.size
    out = []
    for f in detect_faces(image)[:MAX_OBJECTS]:
        box = (max(0.0, f.left / w), max(0.0, f.top / h), min(1.0, f.right / w), min(1.0, f.bottom / h))
        if box[0] < box[2] and box[1] < box[3]:
            out.append(GroundedObject(phrase, box))
    return out


def crop_objects(objects: list[GroundedObject], size: tuple[int, int], bucket: tuple[int, int],
                 flip: bool = False) -> list[GroundedObject]:
    """The boxes after the training cut of their image: resized to cover the (w, h) bucket, centre-cropped,
    flipped when asked (the same cut as data/dataset.py's `_cover_crop`). Boxes cut off the picture are dropped."""
    w, h = size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    left, top = (nw - bw) // 2, (nh - bh) // 2
    out = []
    for o in objects:
        x0, y0, x1, y1 = o.box
        fx0 = min(max((x0 * nw - left) / bw, 0.0), 1.0)
        fx1 = min(max((x1 * nw - left) / bw, 0.0), 1.0)
        fy0 = min(max((y0 * nh - top) / bh, 0.0), 1.0)
        fy1 = min(max((y1 * nh - top) / bh, 0.0), 1.0)
        if fx1 - fx0 < MIN_SIDE or fy1 - fy0 < MIN_SIDE:
            continue
        if flip:
            fx0, fx1 = 1.0 - fx1, 1.0 - fx0
        out.append(GroundedObject(o.phrase, (fx0, fy0, fx1, fy1)))
    return out


def padded(objects: list[GroundedObject], max_objects: int = MAX_OBJECTS):
    """(boxes (max_objects, 4) float32, mask (max_objects,) float32, phrases) for one image: what GLIGEN's
    position net takes, with the phrases still as text (the method encodes them with its text encoder)."""
    import torch

    boxes = torch.zeros(max_objects, 4)
    mask = torch.zeros(max_objects)
    objs = objects[:max_objects]
    if objs:
        boxes[:len(objs)] = torch.tensor([o.box for o in objs], dtype=torch.float32)
        mask[:len(objs)] = 1
    return boxes, mask, [o.phrase for o in objs]


class DatasetBoxes:
    """A dataset's boxes.jsonl for training: `item(dataset, i, flip)` gives item i's padded boxes, cut like its
    pixels (data/dataset.py TrainDataset). Images without a line have no objects (mask all zero)."""

    def __init__(self, root: Path | str) -> None:
        path = boxes_file(root)
        if path is None:
            raise UserError(f"{Path(root).name} has no {FILE}: draw boxes in the Dataset tab (Boxes) or write the "
                            f"file, one line per image.")
        self.path, self.root = path, path.parent
        self.table = read_boxes(path)

    def objects(self, image: Path) -> list[GroundedObject]:
        return objects_for(self.table, image, self.root)

    def item(self, dataset, i: int, flip: bool = False):
        it = dataset.items[i]
        return padded(crop_objects(self.objects(it.path), it.size, it.bucket, flip))
