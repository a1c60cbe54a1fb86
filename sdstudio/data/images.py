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
