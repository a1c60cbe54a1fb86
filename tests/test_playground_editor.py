"""The Playground's image editor stands for the recipe's init image and inpaint mask: the background becomes the
init image (cropped and resized to the output, A1111's "crop and resize"), the painted strokes a white-on-black mask;
and a recipe's files come back into the editor. No browser: the functions the editor's events call."""
from __future__ import annotations

import numpy as np
from PIL import Image

from sdstudio.ui.playground_tab import _editor_value, editor_files


def test_editor_to_files_and_back(workspace):
    bg = Image.new("RGB", (200, 100), (10, 200, 30))
    layer = Image.new("RGBA", (200, 100), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (90, 40, 110, 60))  # a stroke in the middle of the picture
    init, mask = editor_files(workspace, {"background": bg, "layers": [layer], "composite": None}, 64, 64)

    assert init.startswith("inputs/playground/") and mask.startswith("inputs/playground/")  # workspace-relative
    init_img = Image.open(workspace.root / init)
    mask_img = np.asarray(Image.open(workspace.root / mask).convert("L"))
    assert init_img.size == (64, 64) and init_img.getpixel((32, 32)) == (10, 200, 30)
    assert set(np.unique(mask_img)) == {0, 255}  # a hard mask
    assert mask_img[32, 32] == 255 and mask_img[2, 2] == 0  # white where painted, black elsewhere

    # Named by content: the same editor value writes nothing new.
    again = editor_files(workspace, {"background": bg, "layers": [layer], "composite": None}, 64, 64)
    assert again == (init, mask)

    # Nothing painted: plain img2img, no mask. No image: neither.
    assert editor_files(workspace, {"background": bg, "layers": [], "composite": None}, 64, 64) == (init, "")
    assert editor_files(workspace, None, 64, 64) == ("", "")

    # A recipe's files back into the editor: the image as background, the mask as a layer painted where it repaints.
    value = _editor_value(workspace, init, mask)
    assert value["background"] == str(workspace.root / init)
    painted = np.asarray(Image.open(value["layers"][0]).getchannel("A"))
    assert painted[32, 32] == 255 and painted[2, 2] == 0
    assert _editor_value(workspace, "", "") is None
