"""load_base for every kind of ref, single-file round trips, and the pickle rule."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from sdstudio.errors import UserError
from sdstudio.formats.ldm import pipeline_to_ldm
from sdstudio.formats.safe_io import save_safetensors
from sdstudio.models.families import SD1, SD2, SDXL, detect_family_from_keys
from sdstudio.models.loading import load_base


def _image(comps, seed=0):
    return comps.pipeline()("a photo of sks dog", num_inference_steps=3, output_type="np",
                            generator=torch.Generator().manual_seed(seed)).images


def test_load_tiny(tiny_components):
    assert tiny_components.family is SD1
    assert tiny_components.unet.training is False
    assert not any(p.requires_grad for p in tiny_components.unet.parameters())


def test_load_diffusers_folder(tiny_dir, tmp_path, tiny_components):
    folder = shutil.copytree(tiny_dir, tmp_path / "model")
    comps = load_base(str(folder))
    assert comps.source == folder
    assert abs(_image(comps) - _image(tiny_components)).max() == 0


def test_cli_tiny_model_single_file_round_trip(tmp_path, tiny_components):
    """`sdstudio tiny-model OUT --single-file F`: plain diffusers loads the folder, the file loads back the same."""
    out, single = tmp_path / "tiny", tmp_path / "tiny.safetensors"
    r = subprocess.run([sys.executable, "-m", "sdstudio", "tiny-model", str(out), "--single-file", str(single)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    ref = pipe("a photo of sks dog", num_inference_steps=3, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    comps = load_base(str(single))
    assert comps.family is SD1
    assert abs(_image(comps) - ref).max() == 0
    assert abs(_image(tiny_components) - ref).max() == 0


def test_single_file_keys_are_ldm_layout(tiny_components):
    sd = pipeline_to_ldm(tiny_components.unet, tiny_components.vae, tiny_components.text_encoder)
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in sd
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in sd  # first up block's upsampler
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in sd
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # LDM stores 1x1 convs
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in sd


def test_pickle_refused_unless_opted_in(tmp_path, tiny_components):
    sd = pipeline_to_ldm(tiny_components.unet, tiny_components.vae, tiny_components.text_encoder)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd}, ckpt)
    with pytest.raises(UserError, match="pickle"):
        load_base(str(ckpt))
    comps = load_base(str(ckpt), allow_pickle=True)
    assert abs(_image(comps) - _image(tiny_components)).max() == 0


def test_pickle_with_code_is_refused_even_when_opted_in(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": Evil()}}, bad)
    with pytest.raises(UserError, match="weights_only"):
        load_base(str(bad), allow_pickle=True)


@pytest.mark.parametrize("ref, match", [
    ("", "No base model"),
    ("not a model", "is not a model"),
    ("missing/file.safetensors", "does not exist"),
    ("someorg/somemodel", "download it elsewhere"),  # offline hub: says how to point at a local file
])
def test_bad_refs_give_one_sentence(ref, match):
    with pytest.raises(UserError, match=match):
        load_base(ref)


def test_folder_without_model_index(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(UserError, match="not a diffusers model"):
        load_base(str(tmp_path / "x"))


def test_truncated_single_file(tmp_path):
    f = tmp_path / "broken.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")
    with pytest.raises(UserError, match="not a valid .safetensors"):
        load_base(str(f))


def test_family_detection_from_keys():
    assert detect_family_from_keys(["model.diffusion_model.x", "cond_stage_model.transformer.text_model.y"]) is SD1
    assert detect_family_from_keys(["model.diffusion_model.x", "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]) is SD2
    assert detect_family_from_keys(["model.diffusion_model.x", "conditioner.embedders.1.model.ln_final.weight"]) is SDXL
    with pytest.raises(UserError, match="LoRA or an embedding"):
        detect_family_from_keys(["lora_unet_down_blocks_0.lora_down.weight"])


# Parameter counts of the real models (from their published diffusers checkpoints). Building each UNet on the
# meta device costs no memory and proves the configs we ship for offline single-file loading are the real ones.
REAL_COUNTS = {
    ("sd1", "unet"): 859_520_964, ("sd2", "unet"): 865_910_724, ("sdxl", "unet"): 2_567_463_684,
    ("sd1", "vae"): 83_653_863,
    ("sd1", "te0"): 123_060_480, ("sd2", "te0"): 340_387_840, ("sdxl", "te0"): 123_060_480,
    ("sdxl", "te1"): 694_659_840,
}


@pytest.mark.parametrize("family", [SD1, SD2, SDXL], ids=lambda f: f.name)
def test_shipped_family_configs_match_real_models(family):
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**family.unet)
        assert sum(p.numel() for p in unet.parameters()) == REAL_COUNTS[(family.name, "unet")]
        if family is SD1:
            vae = AutoencoderKL(**family.vae)
            assert sum(p.numel() for p in vae.parameters()) == REAL_COUNTS[("sd1", "vae")]
        for i, (cls, cfg, _pad) in enumerate(family.text):
            model = getattr(transformers, cls)(transformers.CLIPTextConfig(**cfg))
            n = sum(p.numel() for p in model.parameters())
            assert n == REAL_COUNTS[(family.name, f"te{i}")], (cls, n)


@pytest.mark.parametrize("family", [SD1, SD2, SDXL], ids=lambda f: f.name)
def test_family_config_dir_is_a_loadable_diffusers_config(family, tmp_path, monkeypatch):
    """The offline config folder: every component's config loads with the real classes, and the tokenizers work."""
    monkeypatch.setenv("SDSTUDIO_CACHE", str(tmp_path))
    import json

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    from sdstudio.models.loading import family_config_dir

    folder = family_config_dir(family)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == family.pipeline_class
    cfg = UNet2DConditionModel.load_config(str(folder / "unet"))
    assert cfg["cross_attention_dim"] == family.unet["cross_attention_dim"]
    tok = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    assert tok("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    if family.is_xl:
        tok2 = CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2"))
        assert tok2.pad_token == "!"


def test_native_resolution_comes_from_the_model(tiny_components):
    # tiny: sample_size 8 latents x VAE scale 8; a real SD 1.5 (sample_size 64) gives 512 the same way
    assert tiny_components.resolution == 64


def _tiny_sd2(folder):
    """The tiny model with SD2's differences: linear proj_in/out in the UNet and a GELU (OpenCLIP) text
    encoder; random weights, the real tokenizer."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdstudio.models import tiny

    base = load_base("tiny")
    torch.manual_seed(5)
    unet = UNet2DConditionModel(**{**tiny.UNET_CONFIG, "use_linear_projection": True})
    te = CLIPTextModel(CLIPTextConfig(**{**tiny.TEXT_CONFIG, "hidden_act": "gelu", "num_hidden_layers": 3}))
    with torch.no_grad():  # norms and biases away from their 1/0 start, so a swapped key changes the output
        for name, p in te.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=te, tokenizer=base.tokenizer, unet=unet,
                                   scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def test_sd2_single_file_round_trip(tmp_path):
    """An SD2 model's single file has OpenCLIP text-encoder keys (fused q/k/v) and loads back to the same
    pictures through diffusers' own single-file loader."""
    from sdstudio.formats.safe_io import save_safetensors

    c = load_base(str(_tiny_sd2(tmp_path / "sd2")))
    assert c.family is SD2
    sd = pipeline_to_ldm(c.unet, c.vae, c.text_encoder, c.family.name)
    assert detect_family_from_keys(sd) is SD2
    assert not [k for k in sd if k.startswith("cond_stage_model.transformer.")]
    qkv = sd["cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight"]
    assert qkv.shape == (3 * 32, 32)
    te = {k.removeprefix("text_model."): v for k, v in c.text_encoder.state_dict().items()}
    assert torch.equal(qkv[32:64], te["encoder.layers.2.self_attn.k_proj.weight"])  # q, k, v in that order
    single = save_safetensors(sd, tmp_path / "sd2.safetensors")
    back = load_base(str(single), config_dir=tmp_path / "sd2")
    assert back.family is SD2
    assert abs(_image(back) - _image(c)).max() == 0


def test_full_finetune_of_an_sd2_base_writes_an_sd2_single_file(tmp_path):
    from train_helpers import fast_sets, make_images

    from sdstudio.formats.safe_io import read_safetensors_keys
    from sdstudio.train.config import load_config
    from sdstudio.train.loop import train

    base = _tiny_sd2(tmp_path / "sd2")
    cfg = load_config(None, fast_sets(make_images(tmp_path / "ds", 2), tmp_path / "out", base_model=str(base),
                                      method="full", max_steps=1, sample_prompts="[]", output_name="ft"))
    outputs = train(cfg, lambda e: None)
    single = [p for p in outputs if p.suffix == ".safetensors"]
    assert len(single) == 1
    keys = read_safetensors_keys(single[0])
    assert detect_family_from_keys(keys) is SD2
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
