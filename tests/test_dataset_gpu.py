"""The CUDA paths of the preparer: BLIP in fp16, class images in the GPU dtype. Run with `pytest -m gpu`."""
from __future__ import annotations

import pytest
from PIL import Image

from test_dataset_models import tiny_blip

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def test_blip_fp16_on_cuda(tmp_path):
    import torch

    from sdstudio.data.caption import BlipCaptioner

    cap = BlipCaptioner(str(tiny_blip(tmp_path / "blip")), device="cuda", max_new_tokens=5, num_beams=2)
    assert cap.model.dtype == torch.float16 and cap.model.device.type == "cuda"
    out = cap.caption([Image.new("RGB", (64, 64), (10, 200, 10))] * 3, [])
    assert len(out) == 3 and all(out)


def test_regularize_on_cuda(tmp_path, tiny_dir, capsys):
    from sdstudio.cli import main

    out = tmp_path / "reg"
    assert main(["regularize", "--model", "tiny", "--class-word", "dog", "--count", "3", "--out", str(out),
                 "--steps", "2", "--size", "64", "--device", "cuda", "--batch-size", "2"]) == 0
    assert len(list(out.glob("*.png"))) == 3
    with Image.open(out / "class_00002.png") as im:
        assert im.size == (64, 64)
