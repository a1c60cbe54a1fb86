"""Masked loss: `<image>.mask.png` beside an image limits what the loss sees (EDLoRA's option, and any method's)."""
from __future__ import annotations

import json

import torch
from PIL import Image

from sdstudio.data.dataset import TrainDataset
from sdstudio.data.folder import list_images, read_dataset
from sdstudio.train.config import load_config
from sdstudio.train.loop import train
from train_helpers import fast_sets, make_kohya_dataset


def _masks(ds, value: int, size=(64, 64)):
    folder = next((ds / "img").iterdir())
    for img in list_images(folder):
        Image.new("L", size, value).save(img.with_name(img.stem + ".mask.png"))
    return folder


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_mask_files_are_not_training_images_and_cut_like_the_image(tmp_path):
    ds = make_kohya_dataset(tmp_path / "ds", n=2)
    folder = _masks(ds, 0)
    half = Image.new("L", (64, 64), 0)
    half.paste(255, (0, 0, 32, 64))  # left half white
    first = list_images(folder)[0]
    half.save(first.with_name(first.stem + ".mask.png"))
    assert len(list_images(folder)) == 2  # the .mask.png files are not images to train on
    cfg = load_config("character-lora-sd15", fast_sets(ds, tmp_path / "run", masked_loss="true"))
    data = TrainDataset(read_dataset(cfg.dataset, default_caption=cfg.instance_prompt), cfg)
    assert data.masks_wanted
    i = next(k for k, it in enumerate(data.items) if it.path == first)
    m = data.mask(i)
    assert m.shape == (1, 8, 8) and m[0, :, :4].min() == 1 and m[0, :, 4:].max() == 0
    flipped = data.mask(i, flip=True)
    assert torch.equal(flipped, m.flip(-1))


def test_black_masks_zero_the_loss_white_masks_change_nothing(tmp_path):
    ds = make_kohya_dataset(tmp_path / "ds", n=2)
    runs = {}
    for name, value, masked in (("plain", None, "false"), ("white", 255, "true"), ("black", 0, "true")):
        if value is not None:
            _masks(ds, value)
        run = tmp_path / name
        train(load_config("character-lora-sd15", fast_sets(ds, run, max_steps=2, masked_loss=masked)), lambda e: None)
        runs[name] = _losses(run)
    assert runs["black"] == [0.0, 0.0]
    assert runs["white"] == runs["plain"] and runs["plain"][0] > 0


def test_edlora_masked_loss_option_asks_the_loader_for_masks(tmp_path):
    ds = make_kohya_dataset(tmp_path / "ds", n=1)
    sets = [s for s in fast_sets(ds, tmp_path / "run") if not s.startswith("sample_prompts")]
    on = load_config("edlora-character-sd15", sets + ["edlora.masked_loss=true", "edlora.attn_reg_weight=0"])
    reg = load_config("edlora-character-sd15", sets)  # the attention regularisation (on by default) reads them too
    off = load_config("edlora-character-sd15", sets + ["edlora.attn_reg_weight=0"])
    layout = read_dataset(on.dataset, default_caption=on.instance_prompt)
    assert TrainDataset(layout, on).masks_wanted and TrainDataset(layout, reg).masks_wanted
    assert not TrainDataset(layout, off).masks_wanted
