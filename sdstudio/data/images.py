"""Open and validate images: EXIF rotation, modes, size limits, decompression bombs.

`open_rgb` is what every reader of user images calls (training, captioning, the Playground's control
images). The dataset issue extends this module (hashes, dedupe, reports); keep `open_rgb`'s contract.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Pillow's own bomb guard warns at ~89 MP and errors at twice that; we refuse above this many pixels.
MAX_PIXELS = 16_384 * 16_384


def open_rgb(path: Path | str, background: tuple[int, int, int] = (255, 255, 255)):
    """An RGB PIL image, upright (EXIF orientation applied), alpha flattened onto `background`.

    Raises UserError with the file name and the reason for anything that is not a usable image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise UserError(f"{path.name} is {w}x{h}, too large to open safely: downscale it below "
                                f"{MAX_PIXELS // 1_000_000} MP.")
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                im = im.point(lambda v: v / 256).convert("L")
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGB", im.size, background)
                bg.paste(im, mask=im.getchannel("A"))
                return bg
            return im.convert("RGB")
    except UserError:
        raise
    except Image.DecompressionBombError as exc:
        raise UserError(f"{path.name} declares a huge size (possible decompression bomb): skipped.") from exc
    except UnidentifiedImageError as exc:
        raise UserError(f"{path.name} is not an image (or its format is unknown): remove it.") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path.name} is damaged or truncated ({exc}): re-export or remove it.") from exc


# ---------------------------------------------------------------------------------------------------------------
# Inspection, hashes and safe imports (the dataset preparer). `open_rgb` above stays the one way to read pixels.
# ---------------------------------------------------------------------------------------------------------------
import hashlib
import os
import shutil
import zipfile
from dataclasses import dataclass, field

# What PIL calls each format, and the extensions that honestly carry it (a PNG named .jpg gets a warning).
FORMAT_EXTS = {"PNG": (".png",), "JPEG": (".jpg", ".jpeg"), "WEBP": (".webp",), "BMP": (".bmp",),
               "GIF": (".gif",), "TIFF": (".tif", ".tiff"), "MPO": (".jpg", ".jpeg")}
# Zip import limits: a zip bomb or a million-entry archive is refused before anything is written.
ZIP_MAX_BYTES = 4 * 1024**3
ZIP_MAX_ENTRIES = 10_000


@dataclass
class ImageInfo:
    """What inspecting one source file found. `image` is the normalised RGB picture when it is usable."""

    path: Path
    image: object = None  # PIL.Image (RGB, upright) or None when skipped
    format: str = ""
    size: tuple[int, int] = (0, 0)  # as stored, after EXIF rotation
    mode: str = ""  # the original mode (CMYK, P, I;16, RGBA, ...)
    notes: list[str] = field(default_factory=list)  # warnings: kept, but worth a look
    error: str = ""  # why it was skipped ("" when usable)
    sha256: str = ""
    dhash: int | None = None
    signature: object = None  # the small normalised thumbnail that confirms a near duplicate (see `signature`)


def inspect_image(path: Path | str, background: tuple[int, int, int] = (255, 255, 255)) -> ImageInfo:
    """Open, validate and normalise one file; never raises for a bad file (the reason goes in `.error`)."""
    from PIL import Image

    path = Path(path)
    info = ImageInfo(path=path)
    try:
        if path.stat().st_size == 0:
            info.error = "empty file (0 bytes)"
            return info
        data = path.read_bytes()
    except OSError as exc:
        info.error = f"cannot be read ({exc.strerror or exc})"
        return info
    info.sha256 = hashlib.sha256(data).hexdigest()
    try:
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        with Image.open(path) as im:  # cheap header read: format, mode, frames
            info.format, info.mode = im.format or "", im.mode
            frames = getattr(im, "n_frames", 1)
            transparent = _has_transparency(im)
        info.image = open_rgb(path, background)
    except UserError as exc:
        info.error = _reason(str(exc), path.name)
        return info
    except Image.DecompressionBombError:
        info.error = "declares a huge size (possible decompression bomb)"
        return info
    except Image.UnidentifiedImageError:
        info.error = "not an image (or an unknown format)"
        return info
    except Exception as exc:  # PIL raises many types for a damaged header
        info.error = f"damaged ({exc})"
        return info
    info.size = info.image.size
    if frames > 1:
        info.notes.append(f"animated ({frames} frames): the first frame is used")
    # An opaque RGBA screenshot converts silently; real transparency and colour-model changes are worth a look.
    if info.mode in ("CMYK", "P", "PA", "LA", "L", "1", "I;16", "I;16B", "I;16L", "I", "F", "YCbCr") or transparent:
        info.notes.append(f"converted from {info.mode} to RGB"
                          + (" (transparent areas flattened onto the background)" if transparent else ""))
    honest = FORMAT_EXTS.get(info.format, ())
    if honest and path.suffix.lower() not in honest:
        info.notes.append(f"is a {info.format} file named {path.suffix or '(no extension)'}")
    info.dhash = dhash(info.image)
    info.signature = signature(info.image)
    return info


def _has_transparency(im) -> bool:
    """True when some pixel is not fully opaque (loads the image; called only on modes that carry alpha)."""
    if im.mode in ("RGBA", "LA", "PA"):
        return im.getchannel("A").getextrema()[0] < 255
    return im.mode == "P" and "transparency" in im.info


def _reason(message: str, name: str) -> str:
    """open_rgb's sentence without the file name and the advice: the reason for a report line."""
    text = message[len(name):].strip() if message.startswith(name) else message
    return text.split(":")[0].rstrip(".").removeprefix("is ").strip() or message


def dhash(image, size: int = 8) -> int:
    """Difference hash: 64 bits of "is this pixel brighter than its right neighbour" on a 9x8 grey thumbnail.
    Robust to resizing, re-encoding and small colour shifts, which is what near-duplicate photos differ by."""
    import numpy as np
    from PIL import Image

    g = np.asarray(image.convert("L").resize((size + 1, size), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (g[:, 1:] > g[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


SIGNATURE_PX = 32
# 95th percentile of the per-pixel difference of two signatures (in standard deviations). Measured on a held-out
# set (tests/test_dataset_near_duplicates.py): resized, re-encoded, brightened and blurred copies stay under 0.35;
# different pictures that share a layout (the same backdrop, the same gradient) start near 0.87.
MAX_SIGNATURE_DIFFERENCE = 0.6


def signature(image):
    """A 32x32 RGB thumbnail, normalised to zero mean and unit spread: what a copy keeps after resizing,
    re-encoding or a brightness change, and what two different pictures with the same coarse layout do not
    share (their subject differs somewhere by many standard deviations)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(image.convert("RGB").resize((SIGNATURE_PX, SIGNATURE_PX), Image.Resampling.BOX),
                   dtype=np.float32)
    return (a - a.mean()) / (a.std() + 1e-6)


def signature_difference(a, b) -> float:
    import numpy as np

    return float(np.percentile(np.abs(a - b).mean(axis=2), 95))


def find_near_duplicates(hashes: dict[str, int], max_distance: int = 10, signatures: dict | None = None,
                         max_difference: float = MAX_SIGNATURE_DIFFERENCE) -> dict[str, str]:
    """{name: name of the earlier image it nearly duplicates}. Two steps: dHashes within `max_distance` bits
    make a candidate (cheap, and loose enough to catch a brightened copy); the signatures then confirm it. A
    dHash alone sees only 8x9 brightness steps, so two different pictures with the same layout (a plain backdrop,
    a sky gradient) looked alike to it. Without signatures, the dHash decides alone at the old, strict 6 bits."""
    seen: list[tuple[str, int]] = []
    dupes: dict[str, str] = {}
    limit = max_distance if signatures else min(max_distance, 6)

    def same(name: str, other: str, h: int, oh: int) -> bool:
        if hamming(h, oh) > limit:
            return False
        if not signatures or signatures.get(name) is None or signatures.get(other) is None:
            return True
        return signature_difference(signatures[name], signatures[other]) <= max_difference

    for name, h in hashes.items():
        match = next((n for n, other in seen if same(name, n, h, other)), None)
        if match is not None:
            dupes[name] = match
        else:
            seen.append((name, h))
    return dupes


def safe_extract_zip(zip_path: Path | str, dest: Path | str, max_bytes: int = ZIP_MAX_BYTES,
                     max_entries: int = ZIP_MAX_ENTRIES) -> tuple[list[Path], list[tuple[str, str]]]:
    """Extract a zip into `dest` without ever writing outside it. Returns (files written, [(entry, why
    skipped)]). Entries with `..`, absolute paths, links or odd types are skipped; a zip over the size or
    entry limits is refused whole (UserError) before anything is written."""
    zip_path, dest = Path(zip_path), Path(dest)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{zip_path.name} is not a readable zip ({exc}): re-create the archive.") from exc
    with zf:
        entries = [i for i in zf.infolist() if not i.is_dir()]
        if len(entries) > max_entries:
            raise UserError(f"{zip_path.name} has {len(entries)} files, more than the {max_entries} allowed: "
                            f"split it or unpack it into a folder.")
        total = sum(i.file_size for i in entries)
        if total > max_bytes:
            raise UserError(f"{zip_path.name} unpacks to {total / 1e9:.1f} GB, more than the "
                            f"{max_bytes / 1e9:.1f} GB allowed: unpack it into a folder first.")
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        written, skipped = [], []
        for info in entries:
            name = info.filename
            parts = Path(name.replace("\\", "/")).parts
            is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
            if is_link:
                skipped.append((name, "a symbolic link inside the zip"))
                continue
            if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                skipped.append((name, "its path points outside the folder (unsafe zip entry)"))
                continue
            if any(p.startswith(".") or p == "__MACOSX" for p in parts):
                continue  # macOS resource forks and hidden files are noise, not data
            target = (root / Path(*parts)).resolve()
            if root not in target.parents:
                skipped.append((name, "its path points outside the folder (unsafe zip entry)"))
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                # Copy at most the declared size: a lying header cannot inflate past the limit.
                shutil.copyfileobj(_Limited(src, info.file_size), out)
            written.append(target)
    return written, skipped


class _Limited:
    def __init__(self, f, limit: int) -> None:
        self.f, self.left = f, limit

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data


def walk_files(folder: Path) -> list[Path]:
    """Every regular file under `folder` (sorted, hidden files and folders left out, symlinks not followed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not name.startswith(".") and p.is_file() and not p.is_symlink():
                out.append(p)
    return out
