"""VAE files as A1111, ComfyUI and civitai share them: `vae-ft-mse-840000-ema-pruned`, `sdxl_vae`, a fine-tune's
"baked" VAE. Three layouts, all read here:
- LDM names (`encoder.down.0.block.0.conv1.weight`), as A1111's `models/VAE` files are;
- the same under `first_stage_model.` (a VAE cut out of a checkpoint, or a whole checkpoint: only its VAE is read);
- diffusers names (`encoder.down_blocks.0.resnets.0.conv1.weight`, an AutoencoderKL's own weights file).

A file names no config: the VAE is built like the base's (`like`), which is also the check that it fits (an
SD 1.x VAE and SDXL's share the architecture, so either loads on either: the colours are the user's call, as in
A1111). LDM names go through diffusers' own converter, the loader `from_single_file` uses.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError

PREFIX = "first_stage_model."


def read_vae(path: Path | str, like, *, allow_pickle: bool = False, dtype=None, device=None):
    """An AutoencoderKL with the weights of the VAE file `path`, configured as the base's VAE `like`."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from .safe_io import check_tensors, load_state_dict

    path = Path(path)
    sd = load_state_dict(path, allow_pickle=allow_pickle)
    if any(k.startswith(PREFIX) for k in sd):
        sd = {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}
    if not any(k.startswith("decoder.") for k in sd):
        raise UserError(f"{path.name} is not a VAE (it has no decoder weights): pick a VAE file, such as "
                        f"vae-ft-mse-840000-ema-pruned.safetensors or sdxl_vae.safetensors.")
    check_tensors(sd, path.name)
    config = dict(like.config)
    if not any(k.startswith("decoder.up_blocks.") for k in sd):  # LDM names
        sd = convert_ldm_vae_checkpoint(sd, config)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    try:
        vae.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as exc:
        raise UserError(f"{path.name} does not fit this base model's VAE ({str(exc).splitlines()[-1].strip()[:120]}): "
                        f"it is a VAE for another kind of model; pick one made for this base.") from None
    vae.requires_grad_(False)
    vae.eval()
    device, dtype = device or like.device, dtype or like.dtype
    return vae if (vae.device, vae.dtype) == (torch.device(device), dtype) else vae.to(device=device, dtype=dtype)
