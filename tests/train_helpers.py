"""Helpers shared by the tests/test_train_*.py files: tiny datasets and fast configs."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def make_images(folder: Path, n: int = 4, captions: bool = True, size=(64, 64), seed: int = 0,
                prefix: str = "sks person") -> Path:
    """n random-noise images (with .txt captions) in folder; deterministic per seed."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = size if i % 2 == 0 else (size[0], size[1] + 32)
        # Smooth blobs rather than white noise: something a model can fit in a few steps.
        base = rng.random((4, 4, 3))
        img = np.kron(base, np.ones((h // 4 + 1, w // 4 + 1, 1)))[:h, :w]
        Image.fromarray((img * 255).astype("uint8")).save(folder / f"{i:03d}.png")
        if captions:
            (folder / f"{i:03d}.txt").write_text(f"{prefix}, picture {i}")
    return folder


def make_conditions(folder: Path) -> list[Path]:
    """A control image `name.cond.png` beside each image of `folder`: its inverted grey, so a condition follows
    its image (and has its size)."""
    from PIL import Image, ImageOps

    from sdstudio.data.folder import list_images

    out = []
    for p in list_images(folder):
        with Image.open(p) as im:
            cond = ImageOps.invert(im.convert("L")).convert("RGB")
        out.append(p.with_name(p.stem + ".cond.png"))
        cond.save(out[-1])
    return out


def make_boxes(root: Path) -> Path:
    """DS/boxes.jsonl for GLIGEN: each instance image but the last gets one to three objects at its own places
    (the last has none, as an unannotated image may)."""
    import json

    from sdstudio.data.folder import list_images

    objects = [("a red hat", [0.1, 0.05, 0.5, 0.4]), ("a dog", [0.45, 0.4, 0.95, 0.95]),
               ("a blue ball", [0.0, 0.6, 0.3, 0.9])]
    lines = []
    images = [p for d in sorted((root / "img").iterdir()) for p in list_images(d)]
    for i, p in enumerate(images[:-1]):
        objs = [{"phrase": ph, "box": box} for ph, box in objects[:1 + i % 3]]
        lines.append(json.dumps({"file_name": p.relative_to(root).as_posix(), "objects": objs}))
    (root / "boxes.jsonl").write_text("\n".join(lines) + "\n")
    return root / "boxes.jsonl"


def make_kohya_dataset(root: Path, n: int = 4, repeats: int = 2, with_reg: bool = False,
                       with_cond: bool = False, with_boxes: bool = False) -> Path:
    """DS/img/<repeats>_sks person/ with n images (and reg/1_person/ class images, name.cond.png control
    images beside the instance images, a boxes.jsonl with grounding objects)."""
    make_images(root / "img" / f"{repeats}_sks person", n)
    if with_reg:
        make_images(root / "reg" / "1_person", 2, captions=False, seed=7)
    if with_cond:
        make_conditions(root / "img" / f"{repeats}_sks person")
    if with_boxes:
        make_boxes(root)
    return root


def fast_sets(dataset: Path, out: Path, **extra) -> list[str]:
    """--set overrides for a fast CPU run on tiny."""
    values = dict(base_model="tiny", dataset=str(dataset), output_dir=str(out), resolution=64, max_steps=4,
                  batch_size=1, sample_steps=1, sample_every=0, save_every=0, device="cpu",
                  sample_prompts='["a photo of sks person"]')
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def train_until_stopped(cfg, step: int, emit=None) -> None:
    """Train `cfg` and press Stop once step `step` is done, as a user would (a checkpoint is kept)."""
    import pytest

    from sdstudio.events import Step
    from sdstudio.jobs import Commands, Stopped
    from sdstudio.train.loop import train

    commands = Commands()

    def on_event(ev):
        if emit is not None:
            emit(ev)
        if isinstance(ev, Step) and ev.step == step:
            commands.stop()

    with pytest.raises(Stopped):
        train(cfg, on_event, commands)
