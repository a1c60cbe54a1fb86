"""The Playground on the built-in tiny SDXL (two text encoders, pooled embeds, time ids, SDXL's block layout):
prompts, LoRAs named lora_te1_/lora_te2_ and clip_l/clip_g embeddings."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdstudio.formats.kinds import kohya_names_for
from sdstudio.formats.safe_io import save_safetensors
from sdstudio.playground.recipe import EmbeddingItem, LoraItem, Recipe
from sdstudio.playground.stack import Stack


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_xl(tiny_dir=None):
    """The built-in tiny SDXL (models/tiny.py), loaded fresh: tests here attach LoRAs to it."""
    from sdstudio.models.loading import load_base

    return load_base("tiny-sdxl")


def xl_lora(comps, seed=1, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    tables = [kohya_names_for(comps.unet, "unet")] + [kohya_names_for(te, "te", i, xl=True)
                                                     for i, te in enumerate(comps.text_encoders)]
    models = [comps.unet] + comps.text_encoders
    for model, names in zip(models, tables):
        for name, path in names.items():
            mod = model.get_submodule(path)
            if not isinstance(mod, torch.nn.Linear):
                continue
            sd[f"{name}.lora_down.weight"] = torch.randn(4, mod.in_features, generator=g) * scale
            sd[f"{name}.lora_up.weight"] = torch.randn(mod.out_features, 4, generator=g) * scale
            sd[f"{name}.alpha"] = torch.tensor(2.0)
    assert any(k.startswith("lora_te2_") for k in sd)
    return sd


def test_sdxl_shaped_base_generates_with_lora_and_clip_l_g_embedding(tiny_dir, tmp_path):
    from sdstudio.formats.embeddings import save_embedding
    from sdstudio.playground.pipeline import generate

    comps = tiny_xl(tiny_dir)
    lora = save_safetensors(xl_lora(comps), tmp_path / "xl.safetensors")
    widths = [te.get_input_embeddings().weight.shape[1] for te in comps.text_encoders]  # clip_l, clip_g
    emb = save_embedding(tmp_path / "e.safetensors", [torch.randn(2, w) for w in widths], "<e>")
    stack = Stack(comps)
    r = Recipe(prompt="a (photo:1.2) of <e>", steps=3, width=64, height=64, sampler="euler", cfg=5.0, seed=2)

    def run(recipe):
        stack.apply(recipe)
        return np.asarray(generate(comps, recipe, stack=stack)[0]).astype(np.int16)

    base = run(r)
    with_lora = run(r.replace(lora=[LoraItem(str(lora), 1.0)]))
    assert np.abs(with_lora - base).mean() > 0.5
    assert np.array_equal(run(r.replace(lora=[LoraItem(str(lora), 0.0)])), base)
    with_emb = run(r.replace(embedding=[EmbeddingItem(str(emb), "<e>")]))
    assert not np.array_equal(with_emb, base)
    # Both encoders got the embedding's own vectors.
    for i, te in enumerate(comps.text_encoders):
        ids = comps.tokenizers[i].convert_tokens_to_ids(stack.embeddings[emb].internal[i])
        assert len(ids) == 2 and not any(t == comps.tokenizers[i].unk_token_id for t in ids)


def test_kohya_sdxl_lora_with_ldm_block_names_loads_like_diffusers_names(tiny_dir, tmp_path):
    """kohya's SDXL LoRAs name UNet modules the LDM (sgm) way. formats.lora.sgm_to_diffusers_names maps them from
    our own diffusers -> LDM table: spot checks against kohya's numbering, every key against diffusers' own
    (private) converter where it exists, and the same image as the same LoRA under diffusers names."""
    from sdstudio.formats.ldm import unet_to_ldm
    from sdstudio.formats.lora import sgm_to_diffusers_names
    from sdstudio.playground.pipeline import generate

    comps = tiny_xl(tiny_dir)
    plain = xl_lora(comps, seed=4)
    names = kohya_names_for(comps.unet, "unet")

    def sgm(key):
        module, dot, rest = key.partition(".")
        if module not in names:
            return key
        ldm = next(iter(unet_to_ldm({names[module] + ".weight": None}, comps.unet.config)))
        return "lora_unet_" + ldm[: -len(".weight")].replace(".", "_") + dot + rest

    sgm_sd = {sgm(k): v for k, v in plain.items()}
    assert any("input_blocks_4_1_transformer_blocks_1_attn2_to_k" in k for k in sgm_sd)
    # kohya's numbering on SDXL's layout (2 layers per block; attention in down blocks 1-2 and up blocks 0-1).
    spot = {"lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k":
            "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_k",
            "lora_unet_output_blocks_5_2_conv": "lora_unet_up_blocks_1_upsamplers_0_conv",
            "lora_unet_input_blocks_4_1_proj_in": "lora_unet_down_blocks_1_attentions_0_proj_in",
            "lora_unet_input_blocks_5_1_transformer_blocks_0_ff_net_2": "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_ff_net_2",
            "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q": "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q",
            "lora_unet_output_blocks_2_1_proj_out": "lora_unet_up_blocks_0_attentions_2_proj_out",
            "lora_unet_input_blocks_3_0_op": "lora_unet_down_blocks_0_downsamplers_0_conv",
            "lora_unet_output_blocks_2_2_conv": "lora_unet_up_blocks_0_upsamplers_0_conv",
            "lora_unet_middle_block_2_in_layers_2": "lora_unet_mid_block_resnets_1_conv1",
            "lora_unet_input_blocks_1_0_emb_layers_1": "lora_unet_down_blocks_0_resnets_0_time_emb_proj",
            "lora_unet_label_emb_0_0": "lora_unet_add_embedding_linear_1"}
    mapped = sgm_to_diffusers_names({f"{k}.alpha": torch.tensor(1.0) for k in spot}, comps.unet)
    assert mapped.keys() == {f"{v}.alpha" for v in spot.values()}
    ours = sgm_to_diffusers_names(sgm_sd, comps.unet)
    assert ours.keys() == plain.keys()
    try:
        from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers
    except ImportError:  # a private helper: only an extra witness while it exists
        _maybe_map_sgm_blocks_to_diffusers = None
    if _maybe_map_sgm_blocks_to_diffusers is not None:
        # It renumbers the blocks but keeps the LDM words, which a later diffusers step swaps.
        theirs = {k.replace("input_blocks", "down_blocks").replace("output_blocks", "up_blocks")
                  .replace("middle_block", "mid_block")
                  for k in _maybe_map_sgm_blocks_to_diffusers(dict(sgm_sd), comps.unet.config)}
        attn = {k for k in plain if "attentions" in k}  # what it maps the same way as diffusers' module paths
        assert len(attn) > 100 and attn <= theirs

    a = save_safetensors(plain, tmp_path / "plain.safetensors")
    b = save_safetensors(sgm_sd, tmp_path / "sgm.safetensors")
    r = Recipe(prompt="a photo", steps=2, width=64, height=64, sampler="euler", cfg=5.0, seed=3)
    images = []
    for f in (a, b):
        stack = Stack(comps)
        recipe = r.replace(lora=[LoraItem(str(f), 0.8)])
        stack.apply(recipe)
        images.append(np.asarray(generate(comps, recipe, stack=stack)[0]))
        stack.apply(r)
    assert np.array_equal(images[0], images[1])
