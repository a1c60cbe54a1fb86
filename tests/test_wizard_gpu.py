"""On a CUDA GPU: each character preset trains on a full-size SD 1.5 (the real architecture with random
weights, built offline: memory does not depend on the weights' values) at 512 px, and its measured peak stays
under the estimate the wizard uses to refuse presets. Also the 6 GB preset's 8-bit Adam runs for real.
Run with `pytest -m gpu` on a machine with CUDA (and bitsandbytes for the 6 GB preset)."""
from __future__ import annotations

import pytest
import torch

from sdstudio.train.config import load_config
from sdstudio.train.estimate import CUDA_CONTEXT_GB, FRAGMENTATION, estimate
from sdstudio.train.loop import train
from train_helpers import make_images

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def sd15_random(tmp_path_factory):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdstudio.models.families import SD1
    from sdstudio.models.tiny import write_tokenizer

    out = tmp_path_factory.mktemp("sd15")
    write_tokenizer(out / "tokenizer")
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD1.unet), vae=AutoencoderKL(**SD1.vae),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD1.text[0][1])),
        tokenizer=CLIPTokenizer.from_pretrained(str(out / "tokenizer")),
        scheduler=PNDMScheduler(**SD1.scheduler[1]), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(str(out / "model"), safe_serialization=True)
    return out / "model"


@pytest.mark.parametrize("preset", ["character-lora-sd15-6gb", "character-lora-sd15-8gb", "character-lora-sd15-12gb"])
def test_measured_peak_is_under_the_estimate(preset, sd15_random, tmp_path):
    ds = make_images(tmp_path / "img" / "1_ohwx woman", 4, size=(512, 512), prefix="ohwx woman")
    cfg = load_config(preset, [f"base_model={sd15_random}", f"dataset={tmp_path}", f"output_dir={tmp_path / 'run'}",
                               "max_steps=4", "sample_every=0", "sample_steps=2", "save_every=0"])
    del ds
    est = estimate(cfg)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    train(cfg, lambda ev: None)
    peak_gb = torch.cuda.max_memory_reserved() / 1024**3
    # The estimate adds the CUDA context (not in the allocator's count) and fragmentation on top.
    budget = est.vram_gb / FRAGMENTATION - CUDA_CONTEXT_GB
    print(f"{preset}: peak reserved {peak_gb:.2f} GB, estimate without context {budget:.2f} GB ({est.vram_gb} GB)")
    assert peak_gb <= budget * 1.05, f"{preset}: measured {peak_gb:.2f} GB > estimated {budget:.2f} GB"
    assert peak_gb >= budget * 0.4, f"{preset}: the estimate ({budget:.2f} GB) is far above the measure ({peak_gb:.2f})"
