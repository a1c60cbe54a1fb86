"""Concept methods on a CUDA GPU in half precision: EDLoRA and TI through the real loop (fp16/bf16 autocast,
fp32 trainable weights), then the files in a half-precision Playground, and a fusion on the GPU.
Run with `pytest -m gpu` on a machine with a GPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from train_helpers import fast_sets, make_kohya_dataset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_edlora_and_ti_train_in_half_precision_and_load(tmp_path, precision):
    from sdstudio.formats.edlora import read_edlora
    from sdstudio.methods.edlora import apply_edlora
    from sdstudio.methods.fusion import FuseConfig, fuse
    from sdstudio.models.loading import load_base
    from sdstudio.concepts.regions import generate
    from sdstudio.train.config import load_config
    from sdstudio.train.loop import train

    ds = make_kohya_dataset(tmp_path / "ds", n=2)
    files = []
    for name, extra in (("a", {"edlora.concept_tokens": "<a1> <a2>"}), ("b", {"edlora.concept_tokens": "<b1> <b2>"})):
        cfg = load_config(None, fast_sets(ds, tmp_path / name, method="edlora", device="cuda", precision=precision,
                                          output_name=name, max_steps=3, **extra))
        files += train(cfg, lambda ev: None)
    ti = load_config(None, fast_sets(ds, tmp_path / "ti", method="textual_inversion", device="cuda",
                                     precision=precision, max_steps=3, **{"textual_inversion.token": "<t>"}))
    assert train(ti, lambda ev: None)

    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    c = load_base("tiny", device="cuda", dtype=dtype)
    apply_edlora(c, files[0])
    img = generate(c, "a photo of <a1> <a2>", steps=3, height=64, width=64, output_type="np")
    assert np.isfinite(img).all()

    fused = load_base("tiny", device="cuda")
    report = fuse(fused, [read_edlora(f) for f in files], FuseConfig(text_encoder_iters=20, unet_iters=10,
                                                                       sample_steps=3, resolution=64))
    assert report.total_fused < report.total_average
