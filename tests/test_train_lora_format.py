"""The LoRA files we write load in diffusers (`load_lora_weights`) and give the in-training model's output."""
from __future__ import annotations

import json

import pytest
import torch

from sdstudio.formats.safe_io import read_safetensors_keys, read_safetensors_metadata
from sdstudio.methods.base import RunInfo
from sdstudio.methods.registry import get_method
from sdstudio.models.loading import load_base
from sdstudio.train.config import load_config


def _trained_lora(tmp_path, sets):
    """Tiny base + the lora method's adapters with random (nonzero) weights, as if trained."""
    from sdstudio.data.folder import read_dataset
    from train_helpers import make_images

    ds = make_images(tmp_path / "ds", 2)
    cfg = load_config(None, [f"dataset={ds}", "base_model=tiny", "output_name=t", "resolution=64",
                             "lora.save_precision=fp32", *sets])
    c = load_base("tiny")
    method = get_method("lora")()
    method.run = RunInfo(cfg=cfg, run_dir=tmp_path, layout=read_dataset(ds), step=7, dataset_hash="abc",
                         tag_frequency={"x": {"sks": 2}})
    torch.manual_seed(0)
    method.prepare(c, cfg)
    with torch.no_grad():
        for name, p in list(c.unet.named_parameters()) + list(c.text_encoder.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.2)
    return c, method


def _image(pipe):
    out = pipe("a photo of sks person", num_inference_steps=2, guidance_scale=1.0, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(3), output_type="np")
    return torch.from_numpy(out.images[0])


def _fresh_pipe(tiny_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("fmt,sets", [
    ("kohya", ["lora.rank=4", "lora.alpha=2", "lora.train_text_encoder=true"]),
    ("diffusers", ["lora.rank=4", "lora.alpha=2", "lora.train_text_encoder=true"]),
    ("diffusers", ["lora.targets=locon", "lora.rank=4", "lora.alpha=8", "lora.conv_rank=2", "lora.conv_alpha=1"]),
])
def test_saved_lora_matches_in_training_model(tmp_path, tiny_dir, fmt, sets):
    c, method = _trained_lora(tmp_path, [f"lora.save_format={fmt}", *sets])
    with torch.no_grad():
        expected = _image(c.pipeline())
    [path] = method.save(c, tmp_path)
    pipe = _fresh_pipe(tiny_dir)
    with torch.no_grad():
        base = _image(pipe)
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        got = _image(pipe)
    assert (base - expected).abs().max() > 1e-3  # the LoRA does something
    assert (got - expected).abs().max() <= 1e-5


def test_kohya_file_names_alpha_and_metadata(tmp_path):
    c, method = _trained_lora(tmp_path, ["lora.rank=4", "lora.alpha=2", "lora.train_text_encoder=true",
                                         "lora.save_precision=fp16"])
    [path] = method.save(c, tmp_path)
    keys = read_safetensors_keys(path)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.alpha" in keys
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    from safetensors.torch import load_file

    sd = load_file(str(path))
    assert sd["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.alpha"].item() == 2.0
    assert sd["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"].dtype == torch.float16
    meta = read_safetensors_metadata(path)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_steps"] == "7"
    assert json.loads(meta["ss_tag_frequency"]) == {"x": {"sks": 2}}
    assert meta["sdstudio.dataset_hash"] == "abc"  # ours: sd-scripts has no such key
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["sdstudio.run_card"])["lora"]["rank"] == 4
    from sdstudio.formats.kinds import detect_kind

    assert detect_kind(path) == "lora"


def test_locon_targets_convs_with_their_own_rank(tmp_path):
    c, method = _trained_lora(tmp_path, ["lora.targets=locon", "lora.rank=4", "lora.conv_rank=2",
                                         "lora.conv_alpha=1"])
    [path] = method.save(c, tmp_path)
    from safetensors.torch import load_file

    sd = load_file(str(path))
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert sd[f"{conv}.lora_down.weight"].shape[:2] == (2, 32) and sd[f"{conv}.lora_down.weight"].ndim == 4
    assert sd[f"{conv}.alpha"].item() == 1.0
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape[0] == 4
    assert not any("lora_te_" in k for k in sd)


def test_training_forward_and_gradients_match_peft_lora(tmp_path):
    """The adapter runtime's training forward (base + alpha/r up(down(x)), sdstudio/adapters) gives peft's LoRA
    outputs and gradients: the same tensors, put in peft LoRA layers on a fresh base. With nothing active the
    layers give the base model's output."""
    from peft import LoraConfig, inject_adapter_in_model

    from sdstudio.adapters import adapter_layers

    c, _ = _trained_lora(tmp_path, ["lora.train_text_encoder=true", "lora.targets=attention_mlp", "lora.rank=4",
                                    "lora.alpha=2"])
    ref = load_base("tiny")
    for ours, theirs in ((c.unet, ref.unet), (c.text_encoder, ref.text_encoder)):
        layers = dict(adapter_layers(ours))
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, target_modules=sorted(layers), init_lora_weights=False),
                                theirs)
        with torch.no_grad():
            for path, layer in layers.items():
                peft_layer = theirs.get_submodule(path)
                peft_layer.lora_A["default"].weight.copy_(layer.adapters["default"].lora_down)
                peft_layer.lora_B["default"].weight.copy_(layer.adapters["default"].lora_up)
        theirs.requires_grad_(False)
        for n, p in theirs.named_parameters():
            p.requires_grad_("lora_" in n)
    torch.manual_seed(1)
    lat, ts = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    ids = torch.randint(0, 1000, (2, 77))

    def run(comps, key):
        params = [p for m in (comps.unet, comps.text_encoder) for n, p in sorted(m.named_parameters()) if key in n]
        ehs = comps.text_encoder(ids, return_dict=False)[0]
        out = comps.unet(lat, ts, ehs, return_dict=False)[0]
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in params]

    out_ours, g_down = run(c, "lora_down")
    out_peft, g_a = run(ref, "lora_A")
    torch.testing.assert_close(out_ours, out_peft, rtol=1e-4, atol=1e-5)
    assert len(g_down) == len(g_a) > 0
    for a, b in zip(g_down, g_a, strict=True):
        torch.testing.assert_close(a.reshape(b.shape), b, rtol=1e-3, atol=1e-6)

    # Nothing active: the base model's output.
    for m in (c.unet, c.text_encoder):
        for _, layer in adapter_layers(m):
            layer.active = []
            layer.plan()
    base = load_base("tiny")
    with torch.no_grad():
        off = c.unet(lat, ts, c.text_encoder(ids, return_dict=False)[0], return_dict=False)[0]
        want = base.unet(lat, ts, base.text_encoder(ids, return_dict=False)[0], return_dict=False)[0]
    torch.testing.assert_close(off, want)
