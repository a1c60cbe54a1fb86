"""Crops: the face-aware crop on a real photo, centre and manual boxes, and the aspect-ratio buckets."""
from __future__ import annotations

import pytest
from PIL import Image

from sdstudio.data.crop import Box, centre_box, crop_image, detect_faces, face_box, make_buckets, nearest_bucket


@pytest.fixture(scope="module")
def astronaut():
    from skimage.data import astronaut

    return Image.fromarray(astronaut())


def test_face_found_on_astronaut(astronaut):
    faces = detect_faces(astronaut)
    assert faces, "the default cascade finds the astronaut's face"
    f = faces[0]
    # Her face is in the upper middle-left of the 512x512 photo.
    assert 150 < (f.left + f.right) / 2 < 300 and 60 < (f.top + f.bottom) / 2 < 180


def test_face_crop_keeps_face_with_margin_when_off_centre(astronaut):
    # Put the photo at the right of a wide canvas: a centre crop would cut the face off, a face crop must not.
    canvas = Image.new("RGB", (1400, 512), (0, 0, 0))
    canvas.paste(astronaut, (880, 0))
    face = detect_faces(canvas)[0]
    centre = centre_box(*canvas.size)
    assert face.left < centre.left or face.right > centre.right or face.right < centre.left or face.left > centre.right
    box, note = face_box(canvas, 1.0, margin=0.5)
    assert note == ""
    assert box.width == box.height == 512
    m = int(face.width * 0.5)
    assert box.left <= face.left - m and box.right >= face.right + m
    assert box.top <= max(face.top - m, 0) and box.bottom >= face.bottom + m
    out, notes = crop_image(canvas, "face", 256)
    assert out.size == (256, 256) and notes == []
    assert detect_faces(out), "the face is still in the cropped image"


def test_face_crop_falls_back_to_centre_with_a_note():
    img = Image.new("RGB", (600, 300), (120, 160, 200))
    out, notes = crop_image(img, "face", 128)
    assert out.size == (128, 128)
    assert notes == ["no face found: centre crop"]


def test_centre_and_manual_crop():
    img = Image.new("RGB", (400, 200), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 100, 200))  # red left strip: outside the centre square
    out, _ = crop_image(img, "centre", 64)
    assert out.size == (64, 64) and out.getpixel((1, 32)) == (0, 0, 0)
    out, notes = crop_image(img, "centre", 64, box=Box(0, 0, 100, 100))
    assert out.size == (64, 64) and out.getpixel((32, 32)) == (255, 0, 0)
    assert notes[0].startswith("manual crop 100x100")
    out, _ = crop_image(img, "centre", 256, box=Box(0, 0, 400, 100))  # a non-square manual box: nearest bucket
    assert out.size[0] > out.size[1]


def test_buckets():
    buckets = make_buckets(512, step=64, max_ratio=2.0)
    assert (512, 512) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w, h) / min(w, h) <= 2.0
        assert (h, w) in buckets
    assert nearest_bucket(1920, 1080, buckets)[0] > nearest_bucket(1920, 1080, buckets)[1]
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)
    assert nearest_bucket(1080, 1920, buckets) == tuple(reversed(nearest_bucket(1920, 1080, buckets)))
    big = make_buckets(1024)
    assert (1024, 1024) in big and len(big) > len(buckets)


def test_bucket_mode_resizes_without_cropping_content():
    img = Image.new("RGB", (900, 600), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 600))  # a white strip at the very left edge
    out, notes = crop_image(img, "bucket", 256)
    assert out.size == nearest_bucket(900, 600, make_buckets(256))
    assert out.getpixel((0, out.height // 2))[0] > 128  # the left edge survived: resized, not cropped


def test_upscale_warning():
    out, notes = crop_image(Image.new("RGB", (50, 50)), "centre", 256)
    assert any("upscaled 5.1x" in n for n in notes)
