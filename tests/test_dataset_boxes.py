"""A dataset's grounding boxes (boxes.jsonl): round trip, one-line errors, the training cut that matches the
pixels' cut exactly, padding into the position net's tensors, and face boxes from the face detector."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sdstudio.data.boxes import (DatasetBoxes, GroundedObject, crop_objects, faces_as_objects, padded, read_boxes,
                                 write_boxes)
from sdstudio.errors import UserError


def test_boxes_jsonl_round_trip_and_one_object_lines_add_up(tmp_path):
    table = {"img/10_sks dog/000.png": [GroundedObject("a dog", (0.1, 0.2, 0.6, 0.9)),
                                        GroundedObject("a ball", (0.7, 0.7, 0.9, 0.95))],
             "img/10_sks dog/001.png": [], "b.png": [GroundedObject("a face", (0.3, 0.1, 0.5, 0.4))]}
    path = write_boxes(tmp_path / "boxes.jsonl", table)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["file_name"] == "img/10_sks dog/000.png"
    assert read_boxes(path) == {k: v for k, v in table.items() if v}
    with path.open("a") as f:
        f.write(json.dumps({"file_name": "b.png", "phrase": "a hat", "box": [0.3, 0.0, 0.5, 0.1]}) + "\n")
    assert [o.phrase for o in read_boxes(path)["b.png"]] == ["a face", "a hat"]


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 1 is not valid JSON"),
    ('{"objects": []}', "line 1 has no file_name"),
    ('{"file_name": "a.png", "objects": [{"phrase": "x", "box": [0.1, 0.2, 1.4, 0.5]}]}', "outside the image"),
    ('{"file_name": "a.png", "objects": [{"phrase": "x", "box": [0.4, 0.2, 0.4, 0.5]}]}', "zero area"),
    ('{"file_name": "a.png", "objects": [{"phrase": "", "box": [0.1, 0.2, 0.4, 0.5]}]}', "without a phrase"),
    ('{"file_name": "a.png", "objects": [{"phrase": "x", "box": "0.1,0.2"}]}', "not four numbers"),
    ('{"file_name": "a.png", "objects": [' + ",".join(['{"phrase": "x", "box": [0, 0, 1, 1]}'] * 31) + "]}",
     "at most 30"),
])
def test_bad_lines_are_one_sentence_with_the_line_number(tmp_path, line, message):
    (tmp_path / "boxes.jsonl").write_text(line + "\n")
    with pytest.raises(UserError, match=message) as info:
        read_boxes(tmp_path / "boxes.jsonl")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("size, bucket, flip", [((120, 80), (64, 64), False), ((120, 80), (64, 64), True),
                                                ((60, 100), (64, 128), True), ((64, 64), (64, 64), False)])
def test_the_training_cut_moves_boxes_with_the_pixels(size, bucket, flip):
    """Draw the box into an image, cut it like the trainer cuts pixels, and find the box again."""
    from sdstudio.data.conditioning import Cut

    w, h = size
    box = (0.45, 0.25, 0.8, 0.7)
    img = np.zeros((h, w), np.uint8)
    img[round(box[1] * h):round(box[3] * h), round(box[0] * w):round(box[2] * w)] = 255
    cut = np.asarray(Cut(size, bucket, flip).image(Image.fromarray(img), Image.Resampling.NEAREST)) > 127
    ys, xs = np.nonzero(cut)
    found = (xs.min() / bucket[0], ys.min() / bucket[1], (xs.max() + 1) / bucket[0], (ys.max() + 1) / bucket[1])
    (got,) = crop_objects([GroundedObject("a thing", box)], size, bucket, flip)
    assert np.allclose(got.box, found, atol=2.5 / min(bucket))
    # A box the crop cuts away entirely is dropped.
    assert crop_objects([GroundedObject("edge", (0.0, 0.0, 0.05, 1.0))], (200, 100), (64, 64)) == []


def test_padded_tensors_and_dataset_items(tmp_path):
    from sdstudio.data.dataset import TrainDataset
    from sdstudio.data.folder import read_dataset
    from sdstudio.train.config import load_config
    from train_helpers import make_kohya_dataset

    ds = make_kohya_dataset(tmp_path / "ds", n=2)
    images = read_dataset(ds).images
    rel = images[0].relative_to(ds).as_posix()
    write_boxes(ds / "boxes.jsonl", {rel: [GroundedObject("a face", (0.25, 0.25, 0.75, 0.75)),
                                           GroundedObject("a hat", (0.3, 0.0, 0.7, 0.2))]})
    data = TrainDataset(read_dataset(ds), load_config(None, [f"dataset={ds}", "resolution=64"]))
    boxes = DatasetBoxes(ds / "img")  # found from the img/ level too
    i = next(k for k, it in enumerate(data.items) if it.path == images[0])
    b, m, phrases = boxes.item(data, i)
    assert b.shape == (30, 4) and m.tolist()[:3] == [1, 1, 0] and phrases == ["a face", "a hat"]
    assert np.allclose(b[0].tolist(), [0.25, 0.25, 0.75, 0.75], atol=0.02)
    fb, _, _ = boxes.item(data, i, flip=True)
    assert np.allclose(fb[1].tolist(), [0.3, 0.0, 0.7, 0.2], atol=0.02)  # a centred box flips onto itself
    other = next(k for k, it in enumerate(data.items) if it.path != images[0])
    b2, m2, p2 = boxes.item(data, other)
    assert not m2.any() and p2 == [] and not b2.any()
    assert padded([])[0].shape == (30, 4)
    with pytest.raises(UserError, match="has no boxes.jsonl"):
        DatasetBoxes(tmp_path)


def test_faces_are_found_as_boxes():
    from skimage import data

    faces = faces_as_objects(Image.fromarray(data.astronaut()), "a face")
    assert faces and faces[0].phrase == "a face"
    x0, y0, x1, y1 = faces[0].box
    assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and (x1 - x0) * (y1 - y0) > 0.005
    assert faces_as_objects(Image.new("RGB", (200, 200), "gray")) == []
