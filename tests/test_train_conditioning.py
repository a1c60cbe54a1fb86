"""The conditioning seam: control images found by the three conventions, cut exactly like their images (bucket,
crop, flip), kept by the latent cache, handed to the method as batch.cond with each item's index; and a
conditioning dataset with bad pairs is refused with every bad pair named, none dropped."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdstudio.data.conditioning import Cut, check_pairs, find_condition
from sdstudio.data.dataset import TrainDataset
from sdstudio.data.folder import read_dataset
from sdstudio.errors import UserError
from sdstudio.train.config import load_config
from train_helpers import fast_sets, make_images, make_kohya_dataset


def _cfg(ds, *sets, method="controlnet"):
    return load_config(None, fast_sets(ds, ds.parent / "run", method=method) + list(sets))


def _save(path: Path, arr) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)
    return path


def test_three_conventions_find_the_condition(tmp_path):
    # 1. name.cond.png beside name.png
    ds = make_kohya_dataset(tmp_path / "a", n=2, with_cond=True)
    lay = read_dataset(ds)
    assert [find_condition(lay, p).name for p in lay.images] == ["000.cond.png", "001.cond.png"]
    assert len(lay.images) == 2  # the .cond.png files are not training images
    # 2. conditioning/ mirroring img/ (what `sdstudio prepare --condition` writes)
    ds = make_kohya_dataset(tmp_path / "b", n=2)
    for p in read_dataset(ds).images:
        _save(ds / "conditioning" / p.parent.name / p.name, np.asarray(Image.open(p)))
    lay = read_dataset(ds)
    assert [find_condition(lay, p).relative_to(ds).parts[0] for p in lay.images] == ["conditioning"] * 2
    # 3. metadata.jsonl with a conditioning_image column (the fill50k layout: images/ and conditioning_images/)
    root = tmp_path / "fill50k"
    rows = []
    for i in range(3):
        _save(root / "images" / f"{i}.png", np.full((64, 64, 3), 40 * i))
        _save(root / "conditioning_images" / f"{i}.png", np.full((64, 64, 3), 255 - 40 * i))
        rows.append({"file_name": f"images/{i}.png", "text": f"circle {i}", "conditioning_image":
                     f"conditioning_images/{i}.png"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    lay = read_dataset(root)
    assert [p.name for p in lay.images] == ["0.png", "1.png", "2.png"]
    assert [lay.captions[p] for p in lay.images] == ["circle 0", "circle 1", "circle 2"]
    assert [find_condition(lay, p).parent.name for p in lay.images] == ["conditioning_images"] * 3
    data = TrainDataset(lay, _cfg(root), conditioning=("control",))
    assert data.cond(1, "control").float().mean().round() == 255 - 40  # the row's own condition


def test_condition_is_cut_like_its_image(tmp_path):
    # A tall image in a bucket (centre-cropped) with its condition = itself: the two stay aligned, flipped or not.
    ds = tmp_path / "ds"
    folder = ds / "img" / "1_x"
    rng = np.random.default_rng(3)
    arr = np.kron(rng.integers(0, 255, (6, 4, 3)), np.ones((48, 48, 1)))  # 192x288 blocks
    _save(folder / "a.png", arr)
    _save(folder / "a.cond.png", arr)
    (folder / "a.txt").write_text("x")
    data = TrainDataset(read_dataset(ds), _cfg(ds, "resolution=256"), conditioning=("control",))
    assert data.items[0].bucket == (192, 320)  # a real bucket, so the cover-crop offsets matter
    for flip in (False, True):
        pix = (data.pixels(0, flip) + 1) * 127.5
        cond = data.cond(0, "control", flip).float()
        assert cond.shape == pix.shape and cond.dtype == torch.float32
        assert (cond - pix).abs().mean() < 6, flip  # resampling differs (lanczos vs bilinear), the cut does not
    other = data.cond(0, "control", True).float()
    assert (other - (data.pixels(0, False) + 1) * 127.5).abs().mean() > 20  # a flip is visible


def test_boxes_follow_the_cut():
    cut = Cut(size=(200, 100), bucket=(64, 64))  # scaled to 128x64, 32 px cropped on each side
    b = cut.boxes(torch.tensor([[0.25, 0.0, 0.5, 1.0], [0.0, 0.0, 0.1, 0.1]]))
    assert torch.allclose(b[0], torch.tensor([0.0, 0.0, 0.5, 1.0]))
    assert b[1, 2] - b[1, 0] == 0  # cut away: no width, but the row stays (items keep their box count)
    flipped = Cut((200, 100), (64, 64), flip=True).boxes(torch.tensor([[0.25, 0.0, 0.5, 1.0]]))
    assert torch.allclose(flipped[0], torch.tensor([0.5, 0.0, 1.0, 1.0]))


def test_bad_pairs_are_each_reported_and_none_dropped(tmp_path):
    ds = make_kohya_dataset(tmp_path / "ds", n=6, with_cond=True)
    folder = ds / "img" / "2_sks person"
    (folder / "001.cond.png").unlink()  # missing
    Image.new("RGB", (32, 32)).save(folder / "002.cond.png")  # another size
    (folder / "003.cond.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # corrupt
    lay = read_dataset(ds)
    pairs = {p.image.name: p for p in check_pairs(lay)}
    assert len(pairs) == 6  # every image is listed, good or bad
    assert pairs["001.png"].problem == "has no condition image"
    assert "is 32x32 but the image is 64x64" in pairs["002.png"].problem
    assert "not a readable image" in pairs["003.png"].problem
    assert not pairs["000.png"].problem and not pairs["004.png"].problem
    with pytest.raises(UserError) as err:
        TrainDataset(lay, _cfg(ds), conditioning=("control",))
    msg = str(err.value)
    assert msg.startswith("3 of 6 images have no usable condition image")
    for name in ("001.png has no condition image", "002.png its condition 002.cond.png is 32x32",
                 "003.png its condition 003.cond.png is not a readable image"):
        assert name in msg
    assert "\n" not in msg  # one sentence, for a toast or the CLI's one line
    # The training preflight refuses it in seconds, before any model loads; a method without conditioning
    # trains on the same folder.
    from sdstudio.train.loop import preflight

    with pytest.raises(UserError, match="3 of 6 images"):
        preflight(_cfg(ds))
    assert preflight(_cfg(ds, method="lora")).data.conditions == {}


def test_cli_names_every_bad_pair_and_exits_2(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    ds = make_kohya_dataset(tmp_path / "ds", n=2)  # no conditions at all
    r = subprocess.run([sys.executable, "-m", "sdstudio", "train", "controlnet-canny-sd15",
                        *sum((["--set", s] for s in fast_sets(ds, tmp_path / "run")), [])],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr[-1500:]
    assert "2 of 2 images have no usable condition image" in r.stderr and "Traceback" not in r.stderr


def test_batches_carry_conditioning_and_index_and_the_latent_cache_keeps_it(tmp_path):
    """Through the real loop: a ControlNet that records what each step's batch holds, once with the disk latent
    cache (conditioning cached with the latents) and once without it."""
    from sdstudio.methods.controlnet import ControlNet
    from sdstudio.train.loop import train

    ds = make_kohya_dataset(tmp_path / "ds", n=3, with_cond=True)

    class Recording(ControlNet):
        seen: list = []

        def loss(self, c, batch, step):
            self.seen.append((list(batch.index), batch.cond["control"].clone(), batch.latents is not None))
            return super().loss(c, batch, step)

    runs = {}
    for cache in ("disk", "off"):
        method = Recording()
        method.seen = []
        cfg = load_config(None, fast_sets(ds, tmp_path / f"run-{cache}", method="controlnet", max_steps=3,
                                          cache_latents=cache, sample_prompts="[]", buckets="false"))
        train(cfg, lambda e: None, method=method)
        runs[cache] = method.seen
    data = TrainDataset(read_dataset(ds), cfg, conditioning=("control",))
    for (idx, control, cached), (idx2, control2, cached2) in zip(runs["disk"], runs["off"]):
        assert cached and not cached2 and idx == idx2
        assert control.shape == (1, 3, 64, 64) and 0 <= control.min() and control.max() <= 1
        want = torch.stack([data.cond(i, "control").float() / 255 for i in idx])
        assert torch.equal(control, want) and torch.equal(control2, want)
    files = list((tmp_path / "run-disk" / "cache" / "latents").glob("*.safetensors"))
    from sdstudio.formats.safe_io import load_state_dict

    assert len(files) == 3 and all(set(load_state_dict(f)) == {"latent", "cond.control"} for f in files)


def test_fill50k_metadata_layout_reads_captions_without_a_kohya_folder(tmp_path):
    root = tmp_path / "plain"
    make_images(root / "images", n=2, captions=False)
    (root / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"images/{i:03d}.png", "text": "t"})
                                                  for i in range(2)))
    assert len(read_dataset(root).images) == 2


def test_a_new_variable_length_condition_plugs_in(tmp_path, monkeypatch):
    """What GLIGEN needs: a `Condition` whose items differ in length (boxes with their phrases), declared by a
    method, cut with the image, handed over as a list per batch, through the latent disk cache too."""
    from sdstudio.data.conditioning import CONDITIONS, Condition
    from sdstudio.methods.lora import Lora
    from sdstudio.train.loop import train

    class Boxes(Condition):
        name, label, required, stacked = "boxes", "box file", False, False

        def locate(self, layout, image):
            p = image.with_suffix(".boxes.json")
            return p if p.is_file() else None

        def read(self, source, cut):
            rows = json.loads(source.read_text()) if source else []
            boxes = torch.tensor([r["box"] for r in rows], dtype=torch.float32).reshape(-1, 4)
            return {"boxes": cut.boxes(boxes), "phrases": [r["phrase"] for r in rows]}

    monkeypatch.setitem(CONDITIONS, "boxes", Boxes())
    ds = make_kohya_dataset(tmp_path / "ds", n=2)
    folder = ds / "img" / "2_sks person"
    (folder / "000.boxes.json").write_text(json.dumps([{"box": [0, 0, 0.5, 0.5], "phrase": "a hat"},
                                                       {"box": [0.5, 0.5, 1, 1], "phrase": "a dog"}]))

    class BoxLora(Lora):
        conditioning = ("boxes",)
        seen: list = []

        def loss(self, c, batch, step):
            self.seen.append({i: v for i, v in zip(batch.index, batch.cond["boxes"])})
            return super().loss(c, batch, step)

    for cache in ("disk", "off"):
        method = BoxLora()
        method.seen = []
        cfg = load_config(None, fast_sets(ds, tmp_path / f"run-{cache}", max_steps=4, cache_latents=cache,
                                          sample_prompts="[]", buckets="false", batch_size=2))
        train(cfg, lambda e: None, method=method)
        items = {i: v for step in method.seen for i, v in step.items()}
        with_boxes = [v for v in items.values() if v["phrases"]]
        assert len(with_boxes) == 1 and with_boxes[0]["phrases"] == ["a hat", "a dog"]
        assert with_boxes[0]["boxes"].shape == (2, 4)
        assert [len(v["phrases"]) for v in items.values()].count(0) == 1  # the other item: no boxes, still there
