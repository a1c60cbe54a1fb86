"""Crops: centre, face-aware (OpenCV Haar cascades), manual boxes, and aspect-ratio buckets.

Every function takes and returns PIL images in RGB. A crop returns (image, notes): a note says what happened
when it is worth knowing ("no face found: centre crop").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

CROP_MODES = ("centre", "face", "bucket", "none")
TARGET_SIZES = (512, 768, 1024)


@dataclass(frozen=True)
class Box:
    """A crop box in source pixels: left, top, right, bottom (right/bottom exclusive, as PIL has it)."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    def tuple(self) -> tuple[int, int, int, int]:
        return (self.left, self.top, self.right, self.bottom)

    def clamp(self, w: int, h: int) -> "Box":
        left, top = max(0, min(self.left, w - 1)), max(0, min(self.top, h - 1))
        return Box(left, top, max(left + 1, min(self.right, w)), max(top + 1, min(self.bottom, h)))


# -- buckets: shared with the training engine -----------------------------------------------------------------
def make_buckets(base_size: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Aspect-ratio buckets of about `base_size`² pixels: (width, height) pairs, both multiples of `step`,
    no side longer than `max_ratio` times the other. Sorted by aspect ratio (tallest first)."""
    if base_size < step:
        raise ValueError(f"base_size {base_size} is smaller than step {step}")
    area = base_size * base_size
    found = {(base_size // step * step, base_size // step * step)}
    w = step
    while w <= base_size * max_ratio:
        h = (area // w) // step * step
        if h >= step and max(w, h) / min(w, h) <= max_ratio + 1e-9:
            found.add((w, h))
            found.add((h, w))
        w += step
    return sorted(found, key=lambda b: (b[0] / b[1], b[0]))


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height (compared in log space, so 2:1 and 1:2 are
    equally far from square); ties go to the larger bucket."""
    r = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - r), -b[0] * b[1]))


# -- boxes ----------------------------------------------------------------------------------------------------
def centre_box(width: int, height: int, aspect: float = 1.0) -> Box:
    """The largest box of `aspect` (w/h) centred in the image."""
    cw, ch = _fit(width, height, aspect)
    left, top = (width - cw) // 2, (height - ch) // 2
    return Box(left, top, left + cw, top + ch)


def _fit(width: int, height: int, aspect: float) -> tuple[int, int]:
    if width / height > aspect:
        return max(1, round(height * aspect)), height
    return width, max(1, round(width / aspect))


def detect_faces(image) -> list[Box]:
    """Frontal faces found by OpenCV's default Haar cascade, largest first. Works on a downscaled copy for
    speed (a 4000 px photo takes seconds at full size); boxes come back in source pixels."""
    import cv2
    import numpy as np

    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    if cascade.empty():
        return []
    scale = min(1.0, 800 / max(image.size))
    small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    grey = cv2.equalizeHist(cv2.cvtColor(np.asarray(small), cv2.COLOR_RGB2GRAY))
    min_side = max(24, int(min(small.size) * 0.06))
    found = cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side))
    boxes = [Box(int(x / scale), int(y / scale), int((x + w) / scale), int((y + h) / scale)) for x, y, w, h in found]
    return sorted(boxes, key=lambda b: -b.width * b.height)


def face_box(image, aspect: float = 1.0, margin: float = 0.6) -> tuple[Box, str]:
    """The largest `aspect` box that keeps the largest face, plus `margin` × its size on every side, inside
    and as close to centred as the image allows. Falls back to the centre box with a note."""
    faces = detect_faces(image)
    w, h = image.size
    if not faces:
        return centre_box(w, h, aspect), "no face found: centre crop"
    f = faces[0]
    pad_x, pad_y = int(f.width * margin), int(f.height * margin)
    want = Box(f.left - pad_x, f.top - pad_y, f.right + pad_x, f.bottom + pad_y)
    cw, ch = _fit(w, h, aspect)
    fx, fy = (f.left + f.right) / 2, (f.top + f.bottom) / 2
    left = int(min(max(fx - cw / 2, 0), w - cw))
    top = int(min(max(fy - ch / 2, 0), h - ch))
    box = Box(left, top, left + cw, top + ch)
    note = "" if (box.left <= max(want.left, 0) and box.top <= max(want.top, 0) and box.right >= min(want.right, w)
                  and box.bottom >= min(want.bottom, h)) else "face crop: the margin around the face was cut short"
    return box, note


# -- the one entry point ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CropPlan:
    """What a crop does to an image of one size, so that a second image of that size (its control image) can
    get exactly the same cut: an optional manual box, an optional inner box, then a cover-resize and a trim."""

    manual: Box | None = None
    inner: Box | None = None
    resize: tuple[int, int] | None = None  # (w, h) after the boxes; None: no resize (mode "none")
    trim: Box | None = None  # the final cut, in resized pixels

    def apply(self, image, resample=None):
        from PIL import Image

        for box in (self.manual, self.inner):
            if box is not None:
                image = image.crop(box.tuple())
        if self.resize is not None:
            image = image.resize(self.resize, Image.Resampling.LANCZOS if resample is None else resample)
            image = image.crop(self.trim.tuple())
        return image


def plan_crop(image, mode: str, size: int, box: Box | None = None, margin: float = 0.6,
              buckets: list[tuple[int, int]] | None = None) -> tuple[CropPlan, list[str]]:
    """The crop `crop_image` makes, as a plan (see there), plus its notes."""
    if mode not in CROP_MODES:
        raise ValueError(f"unknown crop mode {mode!r}; use one of {', '.join(CROP_MODES)}")
    notes: list[str] = []
    w, h = image.size
    manual = inner = None
    if box is not None:
        manual = box.clamp(w, h)
        notes.append(f"manual crop {manual.width}x{manual.height} at ({manual.left}, {manual.top})")
        mode = "centre" if manual.width == manual.height else "bucket"
        w, h = manual.width, manual.height
    if mode == "none":
        return CropPlan(manual), notes
    if mode == "bucket":
        target = nearest_bucket(w, h, buckets or make_buckets(size))
    else:
        target = (size, size)
        if mode == "face":
            # the face is looked for in what the manual box kept
            inner, note = face_box(image.crop(manual.tuple()) if manual else image, 1.0, margin=margin)
        else:
            inner, note = centre_box(w, h, 1.0), ""
        if note:
            notes.append(note)
        w, h = inner.width, inner.height
    # Resize to cover the target, then trim the rounding remainder evenly (a few pixels at most in bucket mode).
    scale = max(target[0] / w, target[1] / h)
    if scale > 2.0:
        notes.append(f"upscaled {scale:.1f}x from {w}x{h}: expect a soft image")
    rw, rh = max(target[0], round(w * scale)), max(target[1], round(h * scale))
    left, top = (rw - target[0]) // 2, (rh - target[1]) // 2
    return CropPlan(manual, inner, (rw, rh), Box(left, top, left + target[0], top + target[1])), notes


def crop_image(image, mode: str, size: int, box: Box | None = None, margin: float = 0.6,
               buckets: list[tuple[int, int]] | None = None):
    """Crop and resize `image` for training. Returns (image, notes).

    - centre: the largest centred square, resized to size×size.
    - face:   a square around the largest face (with `margin`), centre if none.
    - bucket: no crop; resize to the nearest aspect bucket (only a few edge pixels are trimmed to fit).
    - none:   unchanged.
    A manual `box` (from the UI) overrides the mode: it is cropped, then sized like bucket mode.
    `plan_crop` gives the same cut as a plan, to apply to an image's control image as well.
    """
    plan, notes = plan_crop(image, mode, size, box=box, margin=margin, buckets=buckets)
    return plan.apply(image), notes
