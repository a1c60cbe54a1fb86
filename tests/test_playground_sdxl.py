"""The Playground on an SDXL-shaped tiny model (two text encoders, pooled embeds, time ids), built here from
diffusers' own dummy-test sizes: prompts, LoRAs named lora_te1_/lora_te2_ and clip_l/clip_g embeddings."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdstudio.formats.kinds import kohya_names_for
from sdstudio.formats.safe_io import save_safetensors
from sdstudio.playground.recipe import EmbeddingItem, LoraItem, Recipe
from sdstudio.playground.stack import Stack


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_xl(tiny_dir):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdstudio.models.families import get_family
    from sdstudio.models.loading import Components

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                                cross_attention_dim=64)
    cfg = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
               max_position_embeddings=77, projection_dim=32, bos_token_id=49406, eos_token_id=49407,
               pad_token_id=49407, hidden_act="gelu")
    te1 = CLIPTextModel(CLIPTextConfig(**cfg))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    vae = AutoencoderKL.from_pretrained(str(tiny_dir / "vae"))
    toks = [CLIPTokenizer.from_pretrained(str(tiny_dir / "tokenizer")) for _ in range(2)]
    sched = EulerDiscreteScheduler.from_pretrained(str(tiny_dir / "scheduler"))
    for m in (unet, te1, te2, vae):
        m.eval().requires_grad_(False)
    return Components(unet=unet, vae=vae, text_encoders=[te1, te2], tokenizers=toks, scheduler=sched,
                      family=get_family("sdxl"), ref="tiny-xl", dtype=torch.float32)


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
    emb = save_embedding(tmp_path / "e.safetensors", [torch.randn(2, 32), torch.randn(2, 32)], "<e>")
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
