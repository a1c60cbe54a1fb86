"""The box editor's value as Python reads it (never trusted: parsed, clamped, dropped), the Playground's Boxes
panel mapping to [[grounding]] and [[region]] items and back, and the Dataset tab's boxes.jsonl editing."""
from __future__ import annotations

import pytest
from PIL import Image

from sdstudio.errors import UserError
from sdstudio.playground.recipe import GroundingItem, Recipe, RegionItem
from sdstudio.ui.box_editor import editor_value, read_boxes
from sdstudio.ui.grounding_panel import KINDS, apply_boxes, recipe_boxes


def test_editor_values_are_parsed_clamped_and_never_evaluated():
    value = editor_value([
        {"kind": "grounding", "label": " a car ", "box": [0.6, 0.5, -0.2, 1.4]},  # swapped and outside: clamped
        {"kind": "grounding", "label": "x", "box": ["__import__('os')", 0, 1, 1]},  # not numbers: dropped
        {"kind": "grounding", "label": "thin", "box": [0.2, 0.2, 0.205, 0.9]},  # thinner than 1%: dropped
        {"kind": "nope", "label": "y", "box": [0, 0, 1, 1]},  # unknown kind: dropped
        {"kind": "region", "label": "sky", "box": [0, 0, 1, 0.4], "enabled": False, "extra": {"t2i_weight": 0.5}},
        "garbage",
    ], kinds=KINDS)
    got = read_boxes(value, {"grounding", "region"})
    assert [(b["label"], b["box"], b["enabled"]) for b in got] == [("a car", (0.0, 0.5, 0.6, 1.0), True),
                                                                    ("sky", (0.0, 0.0, 1.0, 0.4), False)]
    assert read_boxes(None) == [] and read_boxes({"boxes": "x"}) == []


def test_boxes_panel_maps_to_grounding_and_regions_and_back():
    recipe = Recipe(width=640, height=384, grounding=[GroundingItem("a red car", (0.1, 0.5, 0.4, 0.9))],
                    region=[RegionItem("a castle", "fog", (0.5, 0.0, 1.0, 1.0), t2i_weight=0.3, enabled=False)])
    value = editor_value(recipe_boxes(recipe), width=recipe.width, height=recipe.height, kinds=KINDS)
    back = apply_boxes(Recipe(width=640, height=384), value, "models/gligen/x.safetensors", 0.6)
    assert back.grounding == recipe.grounding and back.region == recipe.region
    assert back.gligen == "models/gligen/x.safetensors" and back.grounding_fraction == 0.6
    # A Mix-of-Show region ([top, left, bottom, right] in pixels) shows as fractions and comes back as fractions.
    mos = Recipe(width=640, height=384, region=[RegionItem("a dog", box=(0, 320, 384, 640), box_format="mixofshow")])
    (shown,) = recipe_boxes(mos)
    assert shown["box"] == [0.5, 0.0, 1.0, 1.0]
    again = apply_boxes(Recipe(width=640, height=384), editor_value([shown], kinds=KINDS), "", 0.3)
    assert again.region[0].box == (0.5, 0.0, 1.0, 1.0) and again.region[0].box_format == "fractions"
    value["boxes"].append({"kind": "grounding", "label": "", "box": [0.2, 0.2, 0.4, 0.4]})
    with pytest.raises(UserError, match="Box 3 has no label"):
        apply_boxes(Recipe(), value, "", 0.3)


def test_dataset_boxes_are_edited_per_image_and_faces_fill_the_rest(tmp_path):
    from skimage import data

    from sdstudio.data.boxes import read_boxes as read_file
    from sdstudio.ui.dataset_boxes_panel import dataset_images, editor_for, fill_faces, save_image_boxes

    ds = tmp_path / "ds"
    (ds / "img" / "5_sks woman").mkdir(parents=True)
    Image.fromarray(data.astronaut()).save(ds / "img" / "5_sks woman" / "a.png")
    Image.new("RGB", (96, 64), "gray").save(ds / "img" / "5_sks woman" / "b.png")
    rels = [p.relative_to(ds).as_posix() for p in dataset_images(ds)]
    assert rels == ["img/5_sks woman/a.png", "img/5_sks woman/b.png"]
    value = editor_for(ds, rels[1])
    assert value["boxes"] == [] and (value["width"], value["height"]) == (96, 64)
    assert value["image"].startswith("data:image/jpeg;base64,")
    value["boxes"] = [{"kind": "object", "label": "a grey wall", "box": [0, 0, 1, 0.5]},
                      {"kind": "object", "label": "off", "box": [0, 0.5, 1, 1], "enabled": False}]
    assert save_image_boxes(ds, rels[1], value) == 1
    assert fill_faces(ds, "a face") == 1  # only a.png had no boxes, and it has a face
    table = read_file(ds / "boxes.jsonl")
    assert [o.phrase for o in table[rels[1]]] == ["a grey wall"]
    assert table[rels[0]] and table[rels[0]][0].phrase == "a face"
    assert editor_for(ds, rels[0])["boxes"][0]["label"] == "a face"
    value["boxes"] = [{"kind": "object", "label": "", "box": [0, 0, 1, 1]}]
    with pytest.raises(UserError, match="has no phrase"):
        save_image_boxes(ds, rels[1], value)
