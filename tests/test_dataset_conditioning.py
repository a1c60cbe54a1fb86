"""Conditioning datasets from the preparer: control images made by a detector (`sdstudio prepare --condition`), or
the user's own pairs cut exactly like their images; bad pairs each reported, none silently dropped; a detector
whose weights are missing names the file and where it goes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from sdstudio.data.conditioning import check_pairs
from sdstudio.data.folder import read_dataset
from sdstudio.data.prepare import PrepareConfig, prepare, scan
from sdstudio.errors import UserError


def _photos(folder: Path, n: int = 4, size=(160, 96)) -> Path:
    """Shapes on a background, non-square, so that crops and buckets matter."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for i in range(n):
        a = np.full((size[1], size[0], 3), 30 + 20 * i, np.uint8)
        x, y = rng.integers(10, size[0] - 50), rng.integers(10, size[1] - 50)
        a[y:y + 40, x:x + 40] = (220, 200 - 30 * i, 40)
        Image.fromarray(a).save(folder / f"p{i}.png")
    return folder


def _cli(*args, home: Path):
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT), SDSTUDIO_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "sdstudio", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)


def test_prepare_condition_canny_writes_pairs_training_reads(tmp_path):
    src = _photos(tmp_path / "photos")
    out = tmp_path / "ws" / "datasets" / "edges"
    r = _cli("prepare", str(src), "--out", str(out), "--size", "64", "--crop", "bucket", "--trigger", "sks",
             "--condition", "canny", home=tmp_path / "ws")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "4 with a control image" in r.stdout
    lay = read_dataset(out)
    pairs = check_pairs(lay)
    assert len(pairs) == 4 and not [p for p in pairs if p.problem]
    for p in pairs:
        assert p.condition.parent == out / "conditioning" / p.image.parent.name  # mirrors img/
        with Image.open(p.image) as im, Image.open(p.condition) as c:
            assert im.size == c.size
            edges = np.asarray(c.convert("L"))
            assert set(np.unique(edges)) <= {0, 255} and (edges == 255).any()  # canny: white edges on black
    rows = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert all(r["conditioning_image"].startswith("conditioning/") for r in rows)  # diffusers' column too
    assert all(r["condition"] for r in json.loads((out / "report.json").read_text()))


def test_users_pairs_are_cut_like_their_images(tmp_path):
    src = _photos(tmp_path / "photos", n=3)
    for p in sorted(src.glob("p*.png")):  # the "condition" is the image itself: after the crop they must agree
        Image.open(p).save(p.with_name(p.stem + ".cond.png"))
    out = tmp_path / "ds"
    rep = prepare(src, out, PrepareConfig(size=64, crop="centre", trigger="sks"))
    assert len(rep.kept) == 3 and not rep.skipped  # the .cond.png files are pairs, not training images
    for item in rep.kept:
        img = np.asarray(Image.open(out / item.output), dtype=float)
        cond = np.asarray(Image.open(out / item.condition), dtype=float)
        assert img.shape == cond.shape == (64, 64, 3)
        assert np.abs(img - cond).mean() < 4  # lanczos vs bilinear at the edges; the cut is the same


def test_bad_pairs_are_each_reported_never_dropped(tmp_path):
    src = _photos(tmp_path / "photos", n=5)
    for p in sorted(src.glob("p*.png")):
        Image.open(p).save(p.with_name(p.stem + ".cond.png"))
    (src / "p1.cond.png").unlink()  # missing
    Image.new("RGB", (10, 10)).save(src / "p2.cond.png")  # another size
    (src / "p3.cond.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # corrupt
    cfg = PrepareConfig(size=64, crop="centre", trigger="sks")
    rows = {r["source"]: r for r in scan(src, tmp_path / "scan", cfg)}  # "Check images" shows them first
    out = tmp_path / "ds"
    rep = prepare(src, out, cfg)
    by = {i.source: i for i in rep.items}
    assert set(by) == {f"p{i}.png" for i in range(5)}  # every source image has a line
    assert [by[f"p{i}.png"].status for i in range(5)] == ["kept", "skipped", "skipped", "skipped", "kept"]
    assert "has no condition image" in by["p1.png"].reasons[0]
    assert "is 10x10 but the image is 160x96" in by["p2.png"].reasons[0]
    assert "not a readable image" in by["p3.png"].reasons[0]
    for name in ("p1.png", "p2.png", "p3.png"):
        assert rows[name]["status"] == "skipped" and rows[name]["reasons"] == by[name].reasons
        assert any(line.startswith(f"  skipped {name}:") for line in rep.lines())
    assert not check_pairs(read_dataset(out))[0].problem  # what was kept trains


def test_detector_without_its_weights_names_the_file(tmp_path):
    src = _photos(tmp_path / "photos", n=1)
    with pytest.raises(UserError, match=r"dpt_hybrid-midas-501f0c75\.pt in models/annotators"):
        prepare(src, tmp_path / "ds", PrepareConfig(size=64, trigger="sks", condition="depth"),
                models_dir=tmp_path / "models")
    assert not (tmp_path / "ds" / "img").exists()  # refused before any image was written
    r = _cli("prepare", str(src), "--out", str(tmp_path / "ds2"), "--trigger", "sks", "--condition", "openpose",
             home=tmp_path / "ws")
    assert r.returncode == 2 and "body_pose_model.pth" in r.stderr and "Traceback" not in r.stderr
    r = _cli("prepare", str(src), "--out", str(tmp_path / "ds3"), "--trigger", "sks", "--condition", "sobel",
             home=tmp_path / "ws")
    assert r.returncode == 2 and "Unknown preprocessor 'sobel'" in r.stderr
