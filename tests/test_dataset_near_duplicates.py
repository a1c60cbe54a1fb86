"""The near-duplicate check: it tells apart a held-out set of similar but different pictures (shifted crops of one
photo, different subjects on the same backdrop, shapes on the same gradient: the layouts that fooled an 8x9 dHash)
and still catches resized, re-encoded, brightened and blurred copies."""
from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from sdstudio.data.images import dhash, find_near_duplicates, hamming, inspect_image, signature


def _reencode(im: Image.Image, fmt: str, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format=fmt, quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def similar_but_different() -> dict[str, Image.Image]:
    """Pictures a person sees as different, each close to another in coarse layout."""
    from skimage import data

    astro = Image.fromarray(data.astronaut())
    out = {}
    for i in range(6):  # the wizard tests' photos: the same photo framed 12 px apart, with a marker
        x, y = 60 + 12 * i, 10 + 8 * i
        im = astro.crop((x, y, x + 300, y + 300)).resize((96, 96))
        ImageDraw.Draw(im).ellipse((4 + 6 * i, 4, 20 + 6 * i, 20), fill=(40 * i % 255, 90, 200))
        out[f"astro-crop-{i}"] = im
    subjects = {"face": astro.crop((150, 40, 330, 220)),
                "cat": Image.fromarray(data.chelsea()).crop((120, 20, 300, 200)),
                "cup": Image.fromarray(data.coffee()).crop((200, 50, 380, 230)),
                "rocket": Image.fromarray(data.rocket()).crop((150, 100, 330, 280))}
    for name, sub in subjects.items():  # a studio: the same backdrop and floor, another subject each time
        im = Image.new("RGB", (512, 512), (235, 235, 230))
        ImageDraw.Draw(im).rectangle((0, 380, 512, 512), fill=(120, 110, 100))
        im.paste(sub.resize((200, 200)), (156, 150))
        out[f"studio-{name}"] = im
    for k in range(3):  # a sky gradient, a different shape in front of it each time
        g = np.linspace(40, 220, 512)[None, :, None].repeat(512, 0).repeat(3, 2).astype(np.uint8)
        im = Image.fromarray(g)
        d = ImageDraw.Draw(im)
        if k == 0:
            d.ellipse((180, 150, 330, 330), fill=(200, 160, 140))
        elif k == 1:
            d.rectangle((200, 150, 320, 330), fill=(30, 30, 30))
        else:
            d.polygon([(256, 140), (180, 330), (330, 330)], fill=(90, 140, 60))
        out[f"gradient-{k}"] = im
    for name in ("chelsea", "coffee", "rocket", "camera"):
        out[name] = Image.fromarray(getattr(data, name)()).convert("RGB")
    return out


def copies(im: Image.Image) -> dict[str, Image.Image]:
    w, h = im.size
    return {"half": im.resize((w // 2, h // 2), Image.Resampling.LANCZOS),
            "jpeg50": _reencode(im, "JPEG", 50),
            "small-jpeg30": _reencode(im.resize((w * 3 // 5, h * 3 // 5)), "JPEG", 30),
            "brighter": ImageEnhance.Brightness(im).enhance(1.1),
            "upscaled": im.resize((w * 3 // 2, h * 3 // 2), Image.Resampling.BICUBIC),
            "webp60": _reencode(im, "WEBP", 60),
            "blurred": im.filter(ImageFilter.GaussianBlur(1))}


def test_the_old_dhash_check_was_fooled_by_this_set():
    """The set is hard for the check we had: a plain dHash at 6 bits flags different pictures here, and misses
    a brightened copy (so the new test below can fail)."""
    pics = similar_but_different()
    h = {k: dhash(v) for k, v in pics.items()}
    assert any(hamming(h[a], h[b]) <= 6 for a, b in itertools.combinations(h, 2))
    assert any(hamming(dhash(c), h[k]) > 6 for k in ("studio-cup", "studio-rocket")
               for c in copies(pics[k]).values())


def test_tells_apart_similar_but_different_pictures_and_catches_copies():
    pics = similar_but_different()
    hashes = {k: dhash(v) for k, v in pics.items()}
    sigs = {k: signature(v) for k, v in pics.items()}
    assert find_near_duplicates(hashes, signatures=sigs) == {}
    for name, im in pics.items():
        for how, copy in copies(im).items():
            key = f"{name}~{how}"
            found = find_near_duplicates({name: hashes[name], key: dhash(copy)},
                                         signatures={name: sigs[name], key: signature(copy)})
            assert found == {key: name}, f"{how} copy of {name} was not caught"


@pytest.mark.parametrize("with_copy", [False, True])
def test_the_dataset_scan_uses_it(tmp_path, with_copy):
    """End to end through the preparer's scan: different studio shots pass, a re-encoded copy is flagged."""
    from sdstudio.data.prepare import PrepareConfig, scan

    src = tmp_path / "src"
    src.mkdir()
    pics = similar_but_different()
    for name in ("studio-face", "studio-cat", "studio-cup", "gradient-0", "gradient-2"):
        pics[name].save(src / f"{name}.png")
    if with_copy:
        copies(pics["studio-cat"])["small-jpeg30"].save(src / "cat-copy.jpg", quality=95)
    rows = {r["source"]: r for r in scan(src, tmp_path / "ds", PrepareConfig(size=256, min_side=64))}
    flagged = {k: r["reasons"] for k, r in rows.items() if any("near-duplicate" in x for x in r["reasons"])}
    assert flagged == ({"studio-cat.png": ["near-duplicate of cat-copy.jpg"]} if with_copy else {})
    assert inspect_image(src / "studio-face.png").signature.shape == (32, 32, 3)
