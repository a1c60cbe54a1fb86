"""Photos for the wizard's tests: crops of skimage's astronaut (a real face), each a little different."""
from __future__ import annotations

from pathlib import Path


def make_photos(folder: Path, n: int = 6, size: int = 96) -> list[Path]:
    from PIL import Image, ImageDraw
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    astro = Image.fromarray(data.astronaut())
    out = []
    for i in range(n):
        x, y = 60 + 12 * i, 10 + 8 * i
        tall = 40 if i % 2 else 0
        im = astro.crop((x, y, x + 300, y + 300 + tall)).resize((size, size + tall * size // 300))
        ImageDraw.Draw(im).ellipse((4 + 6 * i, 4, 20 + 6 * i, 20), fill=(40 * i % 255, 90, 200))
        p = folder / f"photo_{i}.png"
        im.save(p)
        out.append(p)
    return out
