"""ControlNet files: diffusers' ControlNetModel <-> the original layout of lllyasviel's released files.

The original layout (ControlNet 1.1's `control_v11p_sd15_canny`, civitai uploads) is the UNet's encoder in LDM
names plus three parts of its own:
    input_hint_block.{0,2,...,14}   the conditioning embedding (convs; odd indices are SiLUs without weights)
    zero_convs.{i}.0                one zero-initialised 1x1 conv per encoder output
    middle_block_out.0              the zero conv after the middle block
A1111's ControlNet extension and ComfyUI load it (with or without a `control_model.` prefix); so do diffusers'
`from_single_file` and this module's `load_original_controlnet`, which reads it with diffusers' own converter.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError
from .ldm import unet_to_ldm

PREFIX = "control_model."  # ControlNet 1.0 files carry it; 1.1 files do not


def controlnet_to_original(sd: dict, config: dict) -> dict:
    """Rename a diffusers ControlNetModel state dict to the original layout (no prefix)."""
    hint_blocks = {int(m[1]) for k in sd if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k))}
    out, encoder = {}, {}
    for key, value in sd.items():
        if key.startswith("controlnet_cond_embedding."):
            rest = key[len("controlnet_cond_embedding."):]
            if rest.startswith("conv_in."):
                out["input_hint_block.0." + rest[len("conv_in."):]] = value
            elif m := re.match(r"blocks\.(\d+)\.(.*)", rest):
                out[f"input_hint_block.{2 * int(m[1]) + 2}.{m[2]}"] = value
            elif rest.startswith("conv_out."):
                out[f"input_hint_block.{2 * len(hint_blocks) + 2}.{rest[len('conv_out.'):]}"] = value
            else:
                raise ValueError(f"unexpected ControlNet key {key}")
        elif m := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", key):
            out[f"zero_convs.{m[1]}.0.{m[2]}"] = value
        elif key.startswith("controlnet_mid_block."):
            out["middle_block_out.0." + key[len("controlnet_mid_block."):]] = value
        else:
            encoder[key] = value  # time embedding, conv_in, down blocks, mid block: named like the UNet's
    out.update(unet_to_ldm(encoder, {**dict(config), "up_block_types": []}))
    return out


def is_original_controlnet(keys) -> bool:
    keys = set(keys)
    return "zero_convs.0.0.weight" in keys or PREFIX + "zero_convs.0.0.weight" in keys


def load_original_controlnet(path: Path, unet, *, global_pool: bool | None = None):
    """A ControlNetModel from a single file in the original layout, shaped after the base `unet` it will steer.

    The file names no config: its widths come from the base, the hint embedding's from its tensors. Shuffle
    ControlNets pool their output (global_pool), which no tensor shows: like A1111's extension, a file whose
    name says "shuffle" gets it unless `global_pool` says otherwise."""
    import torch
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from .safe_io import load_state_dict

    path = Path(path)
    sd = load_state_dict(path)
    if not is_original_controlnet(sd):
        raise UserError(f"{path.name} is not a ControlNet in the original layout (no zero_convs): pick a ControlNet "
                        f"file or a diffusers ControlNet folder.")
    sd = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in sd.items()}
    hint = sorted((int(m[1]), v) for k, v in sd.items() if (m := re.match(r"input_hint_block\.(\d+)\.weight$", k)))
    # Embedding widths: conv_in's output, then every second block's (the stride-2 convs change the width).
    widths = tuple(int(v.shape[0]) for i, v in hint[:-1] if i == 0 or (i // 2) % 2 == 0)
    with torch.device("meta"):
        model = ControlNetModel.from_unet(unet, conditioning_channels=int(hint[0][1].shape[1]),
                                          conditioning_embedding_out_channels=widths, load_weights_from_unet=False)
    # forward() reads the flag from the config
    model.register_to_config(global_pool_conditions="shuffle" in path.name.lower() if global_pool is None
                             else bool(global_pool))
    converted = convert_controlnet_checkpoint(sd, dict(model.config))
    try:
        model.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as exc:
        raise UserError(f"{path.name} does not fit this base model ({str(exc).splitlines()[0][:120]}): it is a "
                        f"ControlNet for another model family; pick a matching one.") from None
    return model
