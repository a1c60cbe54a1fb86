"""GLIGEN module files: the gated self-attention layers ("fusers") and the text-box position net, alone.

The released GLIGEN checkpoints and ComfyUI's GLIGEN loader (`comfy/gligen.py: load_gligen`) use the
original (LDM) names, without any prefix:

    input_blocks.1.1.transformer_blocks.0.fuser.{linear,attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,
                                                 ff.net.0.proj,ff.net.2,norm1,norm2}.{weight,bias},
                                                 .alpha_attn, .alpha_dense
    middle_block.1.transformer_blocks.0.fuser.*      output_blocks.3.1.transformer_blocks.0.fuser.*
    position_net.linears.{0,2,4}.{weight,bias}, position_net.null_positive_feature,
    position_net.null_position_feature

diffusers keeps the same module names inside a block (`GatedSelfAttentionDense` and
`GLIGENTextBoundingboxProjection` with `feature_type="text-only"`); only the block paths differ
(`down_blocks.0.attentions.0.transformer_blocks.0.fuser.*`, `mid_block.attentions.0...`, `up_blocks.1...`,
`position_net.*`). This module converts between the two, both ways.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError

POSITION_PREFIX = "position_net."
FUSER = ".fuser."
# The keys a text-box GLIGEN position net must have (ComfyUI reads the first two to size it).
POSITION_KEYS = ("position_net.null_positive_feature", "position_net.linears.4.weight",
                 "position_net.null_position_feature")


def is_gligen_keys(keys) -> bool:
    """A GLIGEN module (or a checkpoint that carries one): fuser layers plus a position net."""
    keys = list(keys)
    return any(FUSER in k for k in keys) and any(k.endswith("position_net.null_positive_feature") for k in keys)


def _per_block(config) -> int:
    per = config["layers_per_block"]
    return per if isinstance(per, int) else per[0]


def unet_to_module(sd: dict, config) -> dict:
    """The GLIGEN part of a diffusers UNet state dict (gated layers and position net), in the module-file layout
    ComfyUI loads. Every other key is left out."""
    per = _per_block(config)
    out = {}
    for key, value in sd.items():
        if key.startswith(POSITION_PREFIX):
            out[key] = value
            continue
        if FUSER not in key:
            continue
        if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            out[f"input_blocks.{1 + int(m[1]) * (per + 1) + int(m[2])}.1.{m[3]}"] = value
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            out[f"middle_block.1.{m[1]}"] = value
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            out[f"output_blocks.{int(m[1]) * (per + 1) + int(m[2])}.1.{m[3]}"] = value
        else:
            raise ValueError(f"unexpected GLIGEN key {key}")
    return out


def module_to_unet(sd: dict, config) -> dict:
    """A module file's tensors renamed to the diffusers UNet keys they load into. An LDM checkpoint's
    `model.diffusion_model.` prefix is dropped, so a full original-layout GLIGEN checkpoint gives its GLIGEN
    part too; keys that are not GLIGEN are left out."""
    per = _per_block(config)
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("model.diffusion_model.")
        if key.startswith(POSITION_PREFIX):
            out[key] = value
            continue
        if FUSER not in key:
            continue
        if m := re.match(r"input_blocks\.(\d+)\.1\.(.*)", key):
            i, j = divmod(int(m[1]) - 1, per + 1)
            out[f"down_blocks.{i}.attentions.{j}.{m[2]}"] = value
        elif m := re.match(r"middle_block\.1\.(.*)", key):
            out[f"mid_block.attentions.0.{m[1]}"] = value
        elif m := re.match(r"output_blocks\.(\d+)\.1\.(.*)", key):
            i, j = divmod(int(m[1]), per + 1)
            out[f"up_blocks.{i}.attentions.{j}.{m[2]}"] = value
        else:
            raise UserError(f"The GLIGEN key {key} names no attention block: the file is not a GLIGEN module "
                            f"for an SD UNet.")
    return out


def fuser_paths(unet_sd: dict) -> list[str]:
    """The transformer blocks (diffusers paths) that have a fuser, in the UNet's order (down, mid, up)."""
    paths = {k.split(FUSER)[0] for k in unet_sd if FUSER in k}

    def order(p: str):
        nums = [int(n) for n in re.findall(r"\d+", p)]
        part = 0 if p.startswith("down") else 1 if p.startswith("mid") else 2
        return (part, nums)

    return sorted(paths, key=order)


def check_module(sd: dict, name: str) -> None:
    """One sentence when a file is not a text-box GLIGEN module we can apply."""
    keys = list(sd)
    if not any(FUSER in k for k in keys):
        raise UserError(f"{name} has no GLIGEN fuser layers: it is not a GLIGEN model (pick a GLIGEN module file or "
                        f"a gated checkpoint).")
    missing = [k for k in POSITION_KEYS if k not in sd and f"model.diffusion_model.{k}" not in sd]
    if missing:
        if any("linears_image" in k or "null_image_feature" in k for k in keys):
            raise UserError(f"{name} is a text-image GLIGEN model; the Playground grounds text phrases only: use a "
                            f"text-box GLIGEN model.")
        raise UserError(f"{name} has fuser layers but no position net ({missing[0]} is missing): the file is "
                        f"incomplete.")


def read_module(path: Path | str, allow_pickle: bool = False) -> tuple[dict, dict]:
    """(tensors in the module layout, safetensors metadata) of a GLIGEN module file or a full GLIGEN checkpoint."""
    from .safe_io import load_state_dict, read_safetensors_metadata

    path = Path(path)
    if not path.is_file():
        raise UserError(f"The GLIGEN model {path.name} does not exist: check the path.")
    if path.suffix == ".safetensors":  # read only the GLIGEN tensors (a full checkpoint holds gigabytes more)
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                sd = {k: f.get_tensor(k) for k in f.keys() if FUSER in k or POSITION_PREFIX in k}
        except Exception as exc:  # safetensors raises several types for a corrupt header
            raise UserError(f"{path.name} is not a valid .safetensors file ({exc}); re-download it.") from exc
    else:
        sd = load_state_dict(path, allow_pickle=allow_pickle)
    check_module(sd, path.name)
    meta = read_safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    return sd, meta


def checkpoint_has_gligen(path: Path | str) -> bool:
    """Whether a single-file checkpoint carries GLIGEN layers (an original-layout full GLIGEN model)."""
    from .safe_io import read_safetensors_keys

    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        return is_gligen_keys(read_safetensors_keys(path))
    except Exception:
        return False


def save_module(unet, path: Path | str, metadata: dict[str, str] | None = None, dtype=None) -> Path:
    """Write the GLIGEN part of a gated diffusers UNet as a module file ComfyUI's GLIGEN loader reads (in `dtype`,
    e.g. torch.float16, when given)."""
    from .safe_io import save_safetensors

    sd = unet_to_module({k: v.detach().to(dtype or v.dtype).contiguous() for k, v in unet.state_dict().items()
                         if k.startswith(POSITION_PREFIX) or FUSER in k}, unet.config)
    if not is_gligen_keys(sd):
        raise UserError("This UNet has no GLIGEN layers to save.")
    meta = {"sdstudio.kind": "gligen", "gligen.feature_type": "text-only"}
    meta.update(metadata or {})
    return save_safetensors(sd, path, metadata=meta)
