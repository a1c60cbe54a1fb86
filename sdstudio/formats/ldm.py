"""diffusers -> original (LDM / A1111 / civitai) single-file checkpoint layout, for SD1.x and SD2.x.

Loading goes the other way through diffusers' own `from_single_file` (models/loading.py); this module writes
the files users drop into A1111's or ComfyUI's checkpoint folder.
"""
from __future__ import annotations

import re

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_UNET_TOP = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2.")]


def _resnet_inner(rest: str) -> str:
    for a, b in _RESNET:
        if rest.startswith(a + "."):
            return b + rest[len(a):]
    return rest


def unet_to_ldm(sd: dict, config: dict) -> dict:
    """Rename a diffusers UNet state dict to LDM keys (without the `model.diffusion_model.` prefix)."""
    per = config["layers_per_block"]
    per = per if isinstance(per, int) else per[0]
    up_types = list(config["up_block_types"])
    out = {}
    for key, value in sd.items():
        new = key if key.startswith("position_net.") else None  # GLIGEN's position net keeps its name
        for a, b in _UNET_TOP:
            if key.startswith(a):
                new = b + key[len(a):]
        if new is None and (m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = 1 + i * (per + 1) + j
            new = f"input_blocks.{idx}.0.{_resnet_inner(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
        if new is None and (m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)):
            new = f"input_blocks.{(int(m[1]) + 1) * (per + 1)}.0.op.{m[2]}"
        if new is None and (m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key)):
            new = f"middle_block.{2 * int(m[1])}.{_resnet_inner(m[2])}"
        if new is None and (m := re.match(r"mid_block\.attentions\.0\.(.*)", key)):
            new = f"middle_block.1.{m[1]}"
        if new is None and (m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = i * (per + 1) + j
            new = f"output_blocks.{idx}.0.{_resnet_inner(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
        if new is None and (m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key)):
            i = int(m[1])
            slot = 2 if up_types[i].startswith("CrossAttn") else 1
            new = f"output_blocks.{i * (per + 1) + per}.{slot}.{m[2]}"
        if new is None:
            raise ValueError(f"unexpected UNet key {key}")
        out[new] = value
    return out


_VAE_ATTN = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]


def vae_to_ldm(sd: dict, config: dict) -> dict:
    """Rename a diffusers AutoencoderKL state dict to LDM keys (without the `first_stage_model.` prefix)."""
    n = len(config["block_out_channels"])
    out = {}
    for key, value in sd.items():
        new = key
        if m := re.match(r"(encoder)\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"encoder.down.{m[2]}.block.{m[3]}.{m[4]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            new = f"decoder.up.{n - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
            rest = m[2]
            for a, b in _VAE_ATTN:
                if rest.startswith(a):
                    rest = b + rest[len(a):]
            new = f"{m[1]}.mid.attn_1.{rest}"
            if value.ndim == 2:  # LDM stores the VAE attention projections as 1x1 convs
                value = value[:, :, None, None]
        new = new.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        out[new] = value
    return out


def text_encoder_to_ldm(sd: dict) -> dict:
    """SD1.x text encoder keys as A1111 stores them. transformers 5 has no `.text_model` level; the file
    format keeps it."""
    out = {}
    for key, value in sd.items():
        k = key[len("text_model."):] if key.startswith("text_model.") else key
        out[f"cond_stage_model.transformer.text_model.{k}"] = value
    return out


_OPENCLIP_LAYER = [("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("self_attn.out_proj.", "attn.out_proj."),
                   ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")]


def openclip_text_encoder_to_ldm(sd: dict) -> dict:
    """SD2.x text encoder keys as the original checkpoints store them (OpenCLIP ViT-H: `resblocks` with one
    fused q/k/v `in_proj`). diffusers' SD2 text encoder keeps the 23 layers SD2 uses (it conditions on the
    penultimate layer), so the file has those 23 and no `text_projection`: A1111 and ComfyUI never use the
    24th layer or the projection for SD2, and load without them."""
    import torch

    pre = "cond_stage_model.model."
    sd = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in sd.items()}
    out = {f"{pre}token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           f"{pre}positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           f"{pre}ln_final.weight": sd.pop("final_layer_norm.weight"),
           f"{pre}ln_final.bias": sd.pop("final_layer_norm.bias")}
    sd.pop("embeddings.position_ids", None)
    layers = sorted({int(m[1]) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{pre}transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{part}"] = torch.cat([sd.pop(f"{src}self_attn.{q}_proj.{part}") for q in "qkv"])
        for a, b in _OPENCLIP_LAYER:
            for part in ("weight", "bias"):
                out[f"{dst}{b}{part}"] = sd.pop(f"{src}{a}{part}")
    if sd:
        raise ValueError(f"unexpected text encoder keys {sorted(sd)[:5]}")
    return out


def pipeline_to_ldm(unet, vae, text_encoder, family_name: str = "sd1") -> dict:
    """One state dict in the original single-file layout, for SD1.x (`family_name` "sd1") or SD2.x ("sd2")."""
    if family_name not in ("sd1", "sd2"):
        raise ValueError(f"no single-file layout for {family_name}")
    sd = {f"model.diffusion_model.{k}": v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    sd.update({f"first_stage_model.{k}": v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()})
    te = text_encoder.state_dict()
    sd.update(openclip_text_encoder_to_ldm(te) if family_name == "sd2" else text_encoder_to_ldm(te))
    return sd
