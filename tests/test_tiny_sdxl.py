"""The built-in tiny SDXL ("tiny-sdxl"): SDXL's block layout, two CLIP encoders with the real tokenizer, text_time
conditioning; same bytes every time; plain diffusers loads it; its single file (conditioner.embedders.0/1) loads
back through our loader to identical outputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_tiny_model import _tree_hash

from sdstudio.models import tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def xl_dir():
    return tiny.tiny_model_dir("sdxl")


@pytest.fixture(scope="module")
def xl(xl_dir):
    from sdstudio.models.loading import load_base

    return load_base("tiny-sdxl")


def test_same_bytes_every_time(tmp_path, xl_dir):
    a = tiny.write_tiny_model(tmp_path / "a", "sdxl")
    assert _tree_hash(a) == _tree_hash(xl_dir)
    assert (a / "text_encoder_2" / "model.safetensors").is_file()
    assert json.loads((a / "sdstudio_tiny.json").read_text())["family"] == "sdxl"


def test_sdxl_layout(xl):
    unet = xl.unet
    assert xl.family.name == "sdxl" and xl.family.is_xl
    assert [type(b).__name__ for b in unet.down_blocks] == ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2
    assert [type(b).__name__ for b in unet.up_blocks] == ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"]
    # SDXL's 70 cross-attention layers: 2x2 + 2x10 down, 10 in the middle, 3x10 + 3x2 up.
    assert len([n for n, _ in unet.named_modules() if n.endswith("attn2")]) == 70
    names = dict(unet.named_modules())
    for name in ("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k", "mid_block.attentions.0.proj_in",
                 "up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2", "add_embedding.linear_1"):
        assert name in names, name
    assert unet.config.addition_embed_type == "text_time"
    te1, te2 = xl.text_encoders
    assert type(te1).__name__ == "CLIPTextModel" and type(te2).__name__ == "CLIPTextModelWithProjection"
    # The UNet's context is both encoders' widths side by side; its added embedding takes the 6 time ids and
    # the second encoder's pooled projection, as on SDXL (2048 = 768 + 1280, 2816 = 6 x 256 + 1280).
    assert unet.config.cross_attention_dim == te1.config.hidden_size + te2.config.hidden_size
    assert unet.config.projection_class_embeddings_input_dim == 6 * unet.config.addition_time_embed_dim + \
        te2.config.projection_dim
    assert te1.config.hidden_size != te2.config.hidden_size  # how diffusers' single-file loader tells them apart
    assert 2 ** (len(xl.vae.config.block_out_channels) - 1) == 8 and xl.vae.config.scaling_factor == 0.13025
    assert xl.resolution == 64
    assert sum(p.numel() for p in unet.parameters()) < 10e6


def test_both_tokenizers_are_clip_bpe(xl):
    ids = [49406, 320, 1125, 539, 48136, 1929, 49407]
    for tok in xl.tokenizers:
        assert tok("a photo of sks dog").input_ids == ids and len(tok) == 49408
    # OpenCLIP's tokenizer (the second one) pads with "!" (id 0), CLIP-L's with <|endoftext|>.
    assert xl.tokenizers[0].pad_token_id == 49407 and xl.tokenizers[1].pad_token_id == 0


def _image(pipe, seed=1):
    return pipe("a photo of a dog", num_inference_steps=2, height=64, width=64, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(seed), output_type="np").images[0]


def test_plain_diffusers_loads_it_and_generates(xl_dir, xl):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(xl_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    img = _image(pipe)
    assert img.shape == (64, 64, 3) and np.isfinite(img).all()
    # Our Components make the same pipeline (float noise apart: the two load paths order some kernels differently).
    assert np.abs(img - _image(xl.pipeline())).max() < 1e-5


def test_single_file_round_trip_gives_identical_outputs(tmp_path, xl):
    from sdstudio.cli import main
    from sdstudio.formats.safe_io import read_safetensors_keys
    from sdstudio.models.loading import load_base

    out, single = tmp_path / "xl", tmp_path / "xl.safetensors"
    assert main(["tiny-model", str(out), "--family", "sdxl", "--single-file", str(single)]) == 0
    keys = set(read_safetensors_keys(single))
    # SDXL's original layout: CLIP-L under embedders.0 (transformers names), bigG under embedders.1 (OpenCLIP's
    # resblocks with fused q/k/v and a (width, dim) text_projection).
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight" in keys
    assert not any(k.startswith("cond_stage_model.") for k in keys)

    back = load_base(str(single))
    assert back.family.name == "sdxl"
    for a, b in zip([xl.unet, xl.vae, *xl.text_encoders], [back.unet, back.vae, *back.text_encoders]):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), type(a).__name__
    assert np.array_equal(_image(xl.pipeline(), 3), _image(back.pipeline(), 3))


def test_tiny_sdxl_is_a_ref_like_tiny(xl, tmp_path):
    from sdstudio.models.loading import family_of_ref
    from sdstudio.playground.session import Playground

    assert family_of_ref("tiny-sdxl").name == "sdxl" and family_of_ref("tiny").name == "sd1"
    assert xl.ref == "tiny-sdxl"
    # The Playground takes it by name too, as it takes "tiny" (not as a path in the workspace).
    pg = Playground(resolve=lambda p: tmp_path / p, device="cpu")
    assert pg.base("tiny-sdxl").family.name == "sdxl"
