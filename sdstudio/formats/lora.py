"""LoRA files: peft/diffusers <-> kohya (lora_unet_*, lora_te_*, .alpha) <-> LyCORIS (hada_*, lokr_*).

Module names come from formats/kinds.py (kohya_unet_name, kohya_te_name, kohya_names_for, group_kohya).
"""
from __future__ import annotations


# ======================================================================================================
# Writing (owned by the training-engine issue): trained adapters -> kohya / diffusers files.
# ======================================================================================================

# Kohya is the default because A1111, ComfyUI, Forge and diffusers all load it. Each module keeps its own
# `.alpha` (the scale is alpha/rank per module): without it the output drifts when alpha != rank.

def peft_to_kohya(model, kind: str, index: int = 0, xl: bool = False, adapter: str = "default",
                  dtype=None) -> dict:
    """{kohya key: tensor} for every peft LoRA layer in `model` (kind "unet" or "te")."""
    import torch
    from peft.tuners.lora import LoraLayer

    from .kinds import kohya_te_name, kohya_unet_name

    out = {}
    for path, mod in model.named_modules():
        if not isinstance(mod, LoraLayer) or adapter not in mod.lora_A:
            continue
        if getattr(mod, "use_dora", {}).get(adapter):
            raise ValueError("DoRA layers have no kohya form; save in the diffusers format")
        name = kohya_unet_name(path) if kind == "unet" else kohya_te_name(path, index, xl)
        down, up = mod.lora_A[adapter].weight.detach(), mod.lora_B[adapter].weight.detach()
        # peft's scale is lora_alpha / r (rsLoRA: / sqrt(r)); kohya's is alpha / rank: store the alpha that
        # gives the same scale, so every loader computes what training computed.
        scale = float(mod.scaling[adapter])
        alpha = scale * down.shape[0]
        out[f"{name}.lora_down.weight"] = down if dtype is None else down.to(dtype)
        out[f"{name}.lora_up.weight"] = up if dtype is None else up.to(dtype)
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def save_kohya_lora(path, unet, text_encoders=(), metadata: dict | None = None, dtype=None, xl: bool = False):
    """Write a kohya-format LoRA (lora_unet_* / lora_te_*) atomically; returns the path."""
    from .safe_io import save_safetensors

    sd = peft_to_kohya(unet, "unet", dtype=dtype)
    for i, te in enumerate(text_encoders):
        sd.update(peft_to_kohya(te, "te", index=i, xl=xl, dtype=dtype))
    if not sd:
        raise ValueError("no LoRA layers to save")
    return save_safetensors(sd, path, metadata)


def save_diffusers_lora(path, unet, text_encoders=(), metadata: dict | None = None, dtype=None):
    """Write a diffusers/peft-format LoRA ("unet.*.lora_A.weight", with the LoraConfig as
    `lora_adapter_metadata` so rank and alpha survive) atomically; returns the path."""
    import json
    from pathlib import Path

    from peft.utils import get_peft_model_state_dict

    from .safe_io import save_safetensors

    def cfg_dict(model):
        d = model.peft_config["default"].to_dict()
        return {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}

    sd, adapter_meta = {}, {}
    for prefix, model in [("unet", unet)] + [("text_encoder" if i == 0 else f"text_encoder_{i + 1}", te)
                                             for i, te in enumerate(text_encoders)]:
        layers = get_peft_model_state_dict(model)
        sd.update({f"{prefix}.{k}": (v if dtype is None else v.to(dtype)) for k, v in layers.items()})
        adapter_meta.update({f"{prefix}.{k}": v for k, v in cfg_dict(model).items()})
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(adapter_meta, indent=2, sort_keys=True, default=str)}
    meta.update(metadata or {})
    return save_safetensors(sd, Path(path), meta)



# ======================================================================================================
# Reading (owned by the Playground issue): kohya / diffusers / peft / LyCORIS files -> modules, with each
# module's alpha/rank applied per module (diffusers mis-scales files whose modules differ in rank or alpha).
# ======================================================================================================
