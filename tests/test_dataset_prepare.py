"""`sdstudio prepare` on a corpus of bad input built here: the right files kept, the right ones skipped with
their reasons, no traceback, and nothing written outside the output folder."""
from __future__ import annotations

import io
import json
import os
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdstudio.cli import main


def photo(kind: str = "astronaut", size: tuple[int, int] | None = None) -> Image.Image:
    """A real photo that scikit-image ships (distinct content, so no false near-duplicate flags)."""
    from skimage import data

    arr = {"astronaut": data.astronaut, "coffee": data.coffee, "chelsea": data.chelsea, "rocket": data.rocket,
           "cat": data.cat}[kind]()
    im = Image.fromarray(arr).convert("RGB")
    return im.resize(size, Image.Resampling.LANCZOS) if size else im


def noise(seed: int, size=(300, 300), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.Resampling.BICUBIC).convert(mode)


def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def build_corpus(root: Path) -> dict[str, str]:
    """Write the corpus; returns {source name: expected status or skip-reason fragment}."""
    root.mkdir(parents=True, exist_ok=True)
    exp: dict[str, str] = {}
    # 1. a good photo, with a caption beside it
    photo("astronaut").save(root / "good.jpg", quality=95)
    (root / "good.txt").write_text("a person in a space suit")
    exp["good.jpg"] = "kept"
    # 2. the same bytes again: an exact duplicate
    (root / "good_dup.jpg").write_bytes((root / "good.jpg").read_bytes())
    exp["good_dup.jpg"] = "exact duplicate of good.jpg"
    # 3. the same photo re-encoded smaller: a near duplicate (kept, flagged)
    photo("astronaut", (400, 400)).save(root / "good_small.webp", quality=70)
    exp["good_small.webp"] = "near-duplicate of good.jpg"
    # 4. a truncated PNG
    (root / "truncated.png").write_bytes(png_bytes(noise(1))[:3000])
    exp["truncated.png"] = "skipped"
    # 5. a zero-byte file
    (root / "empty.png").write_bytes(b"")
    exp["empty.png"] = "empty file"
    # 6. a text file renamed .jpg
    (root / "notes.jpg").write_text("this is not a picture\n" * 20)
    exp["notes.jpg"] = "not an image (or an unknown format)"
    # 7. a CMYK JPEG
    photo("coffee").convert("CMYK").save(root / "cmyk.jpg", quality=90)
    exp["cmyk.jpg"] = "converted from CMYK"
    # 8. a 16-bit greyscale PNG
    arr16 = (np.asarray(photo("chelsea").convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(arr16).save(root / "deep16.png")
    exp["deep16.png"] = "converted from I;16"
    # 9. a palette GIF
    photo("rocket").convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.gif")
    exp["palette.gif"] = "converted from P"
    # 10. an animated GIF
    frames = [noise(s, (320, 320)).convert("P") for s in (20, 21, 22)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exp["animated.gif"] = "animated (3 frames)"
    # 11. a PNG that declares a huge size (decompression bomb): a valid header, a tiny body
    bomb = bytearray(png_bytes(Image.new("L", (1, 1))))
    bomb[16:24] = (100_000).to_bytes(4, "big") + (100_000).to_bytes(4, "big")
    import zlib

    bomb[29:33] = zlib.crc32(bytes(bomb[12:29])).to_bytes(4, "big")
    (root / "bomb.png").write_bytes(bytes(bomb))
    exp["bomb.png"] = "huge"
    # 12. an EXIF-rotated photo: stored landscape 400x300, orientation 6 = shown portrait 300x400
    exif = Image.Exif()
    exif[0x0112] = 6
    noise(30, (400, 300)).save(root / "rotated.jpg", exif=exif.tobytes(), quality=90)
    exp["rotated.jpg"] = "kept"
    # 13. an alpha PNG (transparent border)
    rgba = noise(40, (300, 300)).convert("RGBA")
    a = Image.new("L", (300, 300), 0)
    a.paste(255, (50, 50, 250, 250))
    rgba.putalpha(a)
    rgba.save(root / "alpha.png")
    exp["alpha.png"] = "transparent areas flattened"
    # 14. an LA PNG
    noise(50, (300, 300)).convert("LA").save(root / "grey_alpha.png")
    exp["grey_alpha.png"] = "converted from LA"
    # 14b. an opaque RGBA screenshot converts silently
    noise(55, (300, 300)).convert("RGBA").save(root / "opaque_rgba.png")
    exp["opaque_rgba.png"] = "kept"
    # 15. unicode names
    noise(60, (300, 300)).save(root / "写真 ünïcödé.png")
    exp["写真 ünïcödé.png"] = "kept"
    # 16. a tiny image: unusable
    noise(70, (16, 16)).save(root / "tiny.png")
    exp["tiny.png"] = "too small"
    # 17. a small image: kept, warned (upscaled beyond 2x)
    noise(80, (100, 100)).save(root / "small.png")
    exp["small.png"] = "upscaled 2.6x"
    # 18. a PNG named .jpg
    (root / "misnamed.jpg").write_bytes(png_bytes(noise(90, (300, 300))))
    exp["misnamed.jpg"] = "is a PNG file named .jpg"
    # 19. a non-image file
    (root / "readme.pdf").write_bytes(b"%PDF-1.4 not really")
    exp["readme.pdf"] = "not an image file"
    # 20. a zip with ../ entries, an absolute entry, and a good unicode one, in a sub folder
    sub = root / "more"
    sub.mkdir()
    with zipfile.ZipFile(sub / "batch.zip", "w") as zf:
        zf.writestr("../../../../evil.png", png_bytes(noise(100)))
        zf.writestr("/tmp/evil_absolute.png", png_bytes(noise(101)))
        # macOS writes decomposed (NFD) names: the output name comes out composed (NFC)
        zf.writestr(unicodedata.normalize("NFD", "inner/ok_ñ.png"), png_bytes(noise(102, (300, 300))))
    return exp


def _snapshot(root: Path, exclude: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if exclude not in p.parents:
                st = p.stat()
                out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def test_prepare_bad_corpus(tmp_path, capsys):
    src = tmp_path / "messy"
    exp = build_corpus(src)
    out = tmp_path / "ds"
    before = _snapshot(tmp_path, out)
    rc = main(["prepare", str(src), "--out", str(out), "--size", "256",
               "--trigger", "sks", "--class-word", "person", "--repeats", "5"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "Traceback" not in cap.err + cap.out
    # Nothing outside the output folder was written or changed (the zip's ../ and absolute entries included).
    assert _snapshot(tmp_path, out) == before
    assert not Path("/tmp/evil_absolute.png").exists()
    assert not list(tmp_path.parent.glob("evil*.png"))

    report = {r["source"]: r for r in json.loads((out / "report.json").read_text())}
    for name, want in exp.items():
        got = report[name]
        text = "; ".join(got["reasons"])
        if want == "kept":
            assert got["status"] == "kept", (name, got)
        elif want == "skipped":
            assert got["status"] == "skipped", (name, got)
        else:
            assert want in text, (name, got)
    skipped = {n for n, r in report.items() if r["status"] == "skipped"}
    assert skipped == {"good_dup.jpg", "truncated.png", "empty.png", "notes.jpg", "bomb.png", "tiny.png",
                       "readme.pdf", "batch.zip:../../../../evil.png",
                       "batch.zip:/tmp/evil_absolute.png"}
    assert report["batch.zip:../../../../evil.png"]["reasons"] == [
        "its path points outside the folder (unsafe zip entry)"]
    assert report[unicodedata.normalize("NFD", "inner/ok_ñ.png")]["status"] == "kept"
    assert report["rotated.jpg"]["size"] == [300, 400]  # EXIF applied: upright portrait
    # The skip list is printed with reasons.
    assert "skipped notes.jpg: not an image" in cap.out
    assert "skipped empty.png: empty file (0 bytes)" in cap.out

    # The kohya layout: one concept folder, a .txt per image, trigger and class first.
    concept = out / "img" / "5_sks person"
    images = sorted(p.name for p in concept.glob("*.png"))
    kept = [n for n, r in report.items() if r["status"] != "skipped"]
    assert len(images) == len(kept) == 14
    assert "写真 ünïcödé.png" in images and "inner_ok_ñ.png" in images
    for img in concept.glob("*.png"):
        with Image.open(img) as im:
            assert im.size == (256, 256) and im.mode == "RGB"
        assert img.with_suffix(".txt").read_text().startswith("sks person")
    assert (concept / "good.txt").read_text().strip() == "sks person, a person in a space suit"
    with Image.open(concept / "alpha.png") as im:
        assert im.getpixel((2, 2)) == (255, 255, 255)  # alpha flattened onto white
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert {r["file_name"] for r in rows} == {f"img/5_sks person/{n}" for n in images}
    import tomllib

    doc = tomllib.loads((out / "dataset.toml").read_text())
    assert doc["counts"]["kept"] == 14 and doc["settings"]["crop"] == "centre"
    assert {s["file"] for s in doc["skipped"]} == skipped
    assert doc["summary"]["resolutions"] == {"256x256": 14}
    assert not (out / ".import").exists()


def test_prepare_nothing_usable_exits_2(tmp_path, capsys):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "a.jpg").write_text("not an image")
    (src / "b.png").write_bytes(b"")
    rc = main(["prepare", str(src), "--out", str(tmp_path / "ds"), "--trigger", "sks"])
    err = capsys.readouterr().err
    assert rc == 2
    errors = [line for line in err.splitlines() if not line.startswith("[")]  # [stage] lines are progress
    assert errors == [errors[0]] and errors[0].startswith("error: Nothing usable remains of 2 files"), err
    assert not (tmp_path / "ds" / "img").exists()


def test_bucket_mode_and_rerun_replaces(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    photo("chelsea").save(src / "wide.png")  # 451x300
    photo("rocket").save(src / "rocket.png")  # 640x427
    photo("astronaut").save(src / "square.png")
    out = tmp_path / "ds"
    assert main(["prepare", str(src), "--out", str(out), "--crop", "bucket", "--size", "256", "--class-word", "cat",
                 "--repeats", "2", "--caption", "filename"]) == 0
    sizes = {p.name: Image.open(p).size for p in (out / "img" / "2_cat").glob("*.png")}
    assert sizes["square.png"] == (256, 256)
    assert sizes["wide.png"][0] > sizes["wide.png"][1] and sizes["wide.png"][0] % 64 == 0
    assert (out / "img" / "2_cat" / "wide.txt").read_text().strip() == "cat, wide"
    # A second run with other settings replaces img/ whole (no stale concept folder), and keeps reg/.
    (out / "reg" / "1_cat").mkdir(parents=True)
    (out / "reg" / "1_cat" / "x.png").write_bytes(png_bytes(noise(1)))
    assert main(["prepare", str(src), "--out", str(out), "--class-word", "cat", "--repeats", "3",
                 "--size", "128"]) == 0
    assert [p.name for p in (out / "img").iterdir()] == ["3_cat"]
    assert (out / "reg" / "1_cat" / "x.png").is_file()
    capsys.readouterr()


def test_prepare_refuses_out_inside_source(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    noise(1).save(src / "a.png")
    assert main(["prepare", str(src), "--out", str(src / "ds"), "--trigger", "t"]) == 2
    assert "inside it" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--trigger", "", "--class-word", ""], ["--size", "100", "--trigger", "t"],
                                 ["--trigger", "a/b"]])
def test_prepare_bad_settings(tmp_path, capsys, bad):
    src = tmp_path / "src"
    src.mkdir()
    assert main(["prepare", str(src), "--out", str(tmp_path / "ds"), *bad]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_manual_crop_and_face_crop_through_prepare(tmp_path):
    from sdstudio.data.crop import detect_faces
    from sdstudio.data.prepare import PrepareConfig, prepare

    src = tmp_path / "src"
    src.mkdir()
    canvas = Image.new("RGB", (1200, 512), (0, 0, 0))
    canvas.paste(photo("astronaut"), (688, 0))  # the face sits far right: a centre crop would miss it
    canvas.save(src / "wide.png")
    img = Image.new("RGB", (400, 200), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 100, 100))
    img.save(src / "red_corner.png")
    cfg = PrepareConfig(size=128, crop="face", class_word="person",
                        manual_crops={"red_corner.png": (0, 0, 100, 100)})
    report = prepare(src, tmp_path / "ds", cfg)
    by = {i.source: i for i in report.items}
    assert by["red_corner.png"].reasons[0].startswith("manual crop 100x100")
    folder = tmp_path / "ds" / "img" / "10_person"
    with Image.open(folder / "red_corner.png") as im:
        assert im.size == (128, 128) and im.getpixel((64, 64)) == (255, 0, 0)
    with Image.open(folder / "wide.png") as im:
        assert detect_faces(im.convert("RGB").resize((512, 512))), "the face is inside the face crop"


def test_stopped_prepare_leaves_the_old_dataset(tmp_path):
    from sdstudio.data.prepare import PrepareConfig, prepare
    from sdstudio.events import Progress
    from sdstudio.jobs import JobManager

    src = tmp_path / "src"
    src.mkdir()
    for k in range(4):
        noise(200 + k, (128, 128)).save(src / f"n{k}.png")
    out = tmp_path / "ds"
    prepare(src, out, PrepareConfig(size=64, class_word="old", repeats=1))
    before = sorted(p.name for p in (out / "img" / "1_old").iterdir())

    def stop_at_second(ev):
        if isinstance(ev, Progress) and ev.stage == "prepare" and ev.done == 2:
            job.stop()

    job = JobManager().start("prep", "dataset", lambda jc: prepare(src, out, PrepareConfig(size=64, class_word="new"),
                                                                  emit=jc.emit, check=jc.commands.check),
                             listeners=[stop_at_second])
    job.join(60)
    assert job.state == "stopped"
    assert [p.name for p in (out / "img").iterdir()] == ["1_old"]  # the half-built folder never replaced it
    assert sorted(p.name for p in (out / "img" / "1_old").iterdir()) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".img")]


def test_zip_limits_and_links(tmp_path):
    from sdstudio.data.images import safe_extract_zip
    from sdstudio.errors import UserError

    z = tmp_path / "many.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for k in range(5):
            zf.writestr(f"f{k}.png", png_bytes(noise(k, (8, 8))))
    with pytest.raises(UserError, match="more than the 3 allowed"):
        safe_extract_zip(z, tmp_path / "a", max_entries=3)
    with pytest.raises(UserError, match="unpacks to"):
        safe_extract_zip(z, tmp_path / "b", max_bytes=100)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("evil_link.png")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
        zf.writestr("ok.png", png_bytes(noise(1, (8, 8))))
    written, skipped = safe_extract_zip(link, tmp_path / "c")
    assert [p.name for p in written] == ["ok.png"]
    assert skipped == [("evil_link.png", "a symbolic link inside the zip")]
