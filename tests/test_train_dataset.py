"""Dataset reading and validation: every folder mistake is found before any model loads, in one sentence."""
from __future__ import annotations

import time

import pytest

from sdstudio.data.dataset import TrainDataset, make_buckets, process_caption
from sdstudio.data.folder import read_dataset
from sdstudio.errors import UserError
from sdstudio.train.config import load_config
from train_helpers import make_images, make_kohya_dataset


def _cfg(ds, *sets):
    return load_config(None, [f"dataset={ds}", "resolution=64", *sets])


def test_kohya_root_img_level_and_plain_folder_are_read(tmp_path):
    ds = make_kohya_dataset(tmp_path / "ds", n=3, repeats=4, with_reg=True)
    lay = read_dataset(ds, need_class=True)
    assert lay.kind == "kohya" and lay.concepts[0].repeats == 4 and len(lay.class_images) == 2
    assert lay.captions[lay.images[0]].startswith("sks person")
    assert lay.captions[lay.class_images[0]] == "person"  # uncaptioned class images: the folder's class word
    assert read_dataset(ds / "img").kind == "kohya"  # kohya's train_data_dir level works too
    plain = make_images(tmp_path / "plain", 2)
    assert read_dataset(plain).kind == "plain"


def test_metadata_jsonl_captions(tmp_path):
    folder = make_images(tmp_path / "p", 2, captions=False)
    (folder / "metadata.jsonl").write_text('{"file_name": "000.png", "text": "one"}\n'
                                           '{"file_name": "001.png", "text": "two"}\n')
    lay = read_dataset(folder)
    assert sorted(lay.captions.values()) == ["one", "two"]


@pytest.mark.parametrize("case,match", [
    ("concept_folder", "one concept folder inside a dataset: choose the dataset folder"),
    ("parent", "holds 2 dataset folder"),
    ("empty", "has no images"),
    ("missing", "does not exist"),
    ("partial_captions", r"1 of 3 images have no caption \(002.png\)"),
    ("no_class", "Prior preservation is on but"),
])
def test_folder_mistakes_are_found_at_once(tmp_path, case, match):
    ds = make_kohya_dataset(tmp_path / "ds", n=3)
    need_class = False
    if case == "concept_folder":
        path = ds / "img" / "2_sks person"
    elif case == "parent":
        make_kohya_dataset(tmp_path / "ds2", n=1)
        path = tmp_path
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        path = tmp_path / "empty"
    elif case == "missing":
        path = tmp_path / "nope"
    elif case == "partial_captions":
        path = make_images(tmp_path / "plain", 3)
        (path / "002.txt").unlink()
    else:
        path, need_class = ds, True
    t = time.time()
    with pytest.raises(UserError, match=match) as err:
        read_dataset(path, need_class=need_class)
    assert time.time() - t < 2 and "\n" not in str(err.value)


def test_uncaptioned_plain_folder_uses_instance_prompt(tmp_path):
    folder = make_images(tmp_path / "p", 2, captions=False)
    with pytest.raises(UserError, match="2 of 2 images have no caption"):
        read_dataset(folder)
    assert set(read_dataset(folder, default_caption="a photo of sks dog").captions.values()) == {"a photo of sks dog"}


def test_buckets_repeats_and_deterministic_order(tmp_path):
    ds = make_kohya_dataset(tmp_path / "ds", n=4, repeats=3)  # two 64x64 and two 64x96 images
    data = TrainDataset(read_dataset(ds), _cfg(ds, "batch_size=2", "resolution=256"))
    assert {it.bucket for it in data.items} == {(256, 256), (192, 320)}  # portrait images get a portrait bucket
    assert data.batches_per_epoch == 6  # 12 samples with repeats, 2 buckets of 6, batches of 2
    for g in range(12):
        _, idxs = data.batch_indices(g)
        assert len({data.items[i].bucket for i in idxs}) == 1  # one bucket per batch
    again = TrainDataset(read_dataset(ds), _cfg(ds, "batch_size=2", "resolution=256"))
    assert [again.batch_indices(g) for g in range(12)] == [data.batch_indices(g) for g in range(12)]
    assert data.epoch_batches(0) != data.epoch_batches(1)  # a new order every epoch
    pix = data.pixels(1)
    assert pix.shape == (3, 320, 192) and -1 <= pix.min() and pix.max() <= 1
    assert (128, 128) in make_buckets(128) and all(w % 64 == 0 and h % 64 == 0 for w, h in make_buckets(512))


def test_caption_shuffle_keeps_leading_tokens_and_dropout():
    import random

    rng = random.Random(0)
    outs = {process_caption("sks, a, b, c, d", rng, 0.0, True, 1) for _ in range(20)}
    assert all(o.startswith("sks, ") for o in outs) and len(outs) > 1
    assert process_caption("sks, a", random.Random(0), 1.0, False, 1) == ""
