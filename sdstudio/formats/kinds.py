"""What a model file is, from its tensor names alone, and the kohya/A1111 module names every LoRA tool uses.

The Library tab lists files by kind; loaders pick their path by kind; savers name modules so that A1111 and
ComfyUI recognise them (see DESIGN.md, "LoRA file names that A1111 and ComfyUI recognise").
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

KINDS = ("lora", "lycoris", "embedding", "edlora", "gligen", "controlnet", "t2i_adapter", "checkpoint", "vae",
         "unknown")

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
LYCORIS_SUFFIXES = (".hada_w1_a", ".hada_w1_b", ".lokr_w1", ".lokr_w1_a", ".lokr_w2", ".lokr_w2_a")


def detect_kind_from_keys(keys) -> str:
    """Classify a state dict by its keys. Order matters: the most specific patterns come first."""
    keys = list(keys)
    ks = set(keys)
    if any(k.startswith("edlora.") or k.startswith("new_concept_embedding.") for k in keys):
        return "edlora"
    if not any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in keys):
        from .gligen import is_gligen_keys

        if is_gligen_keys(keys):  # a GLIGEN module alone (a full GLIGEN checkpoint is a checkpoint)
            return "gligen"
    if any(k.endswith(LYCORIS_SUFFIXES) for k in keys):
        return "lycoris"
    if any(".lora_down." in k or ".lora_up." in k or ".lora_A." in k or ".lora_B." in k or ".lora.down." in k
           for k in keys):
        return "lora"
    if ks & {"emb_params", "string_to_param", "clip_l", "clip_g"} or any(k.startswith("string_to_param") for k in keys):
        return "embedding"
    if len(keys) == 1 and next(iter(keys)).startswith("<") and next(iter(keys)).endswith(">"):
        return "embedding"  # diffusers learned_embeds: {"<token>": tensor}
    if keys and all(k.startswith("first_stage_model.") for k in keys):
        return "vae"  # a VAE saved with its checkpoint prefix
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.")) for k in keys):
        return "checkpoint"
    if any(k.startswith("encoder.") for k in keys) and any(k.startswith("decoder.") for k in keys) and \
            any(k.startswith(("quant_conv.", "post_quant_conv.")) for k in keys):
        return "vae"  # A1111's VAE files (vae-ft-mse-840000-ema-pruned) and diffusers AutoencoderKL weights
    if any(k.startswith(("controlnet_cond_embedding.", "control_model.", "input_hint_block.", "zero_convs."))
           for k in keys):  # diffusers, ControlNet 1.0 (prefixed) and 1.1 (bare) layouts
        return "controlnet"
    if any(k.startswith("adapter.") or k.startswith("body.") for k in keys) and not any("conv_in" in k for k in keys):
        return "t2i_adapter"
    return "unknown"


def detect_kind(path: Path | str) -> str:
    """The kind of a model file or diffusers folder on disk, reading only headers and configs."""
    from .safe_io import read_safetensors_keys

    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return "checkpoint"
        cfg = path / "config.json"
        if cfg.is_file():
            try:
                name = json.loads(cfg.read_text()).get("_class_name", "")
            except (OSError, json.JSONDecodeError):
                return "unknown"
            if "ControlNet" in name:
                return "controlnet"
            if "Adapter" in name:
                return "t2i_adapter"
        return "unknown"
    if path.suffix == ".safetensors":
        try:
            return detect_kind_from_keys(read_safetensors_keys(path))
        except Exception:
            return "unknown"
    if path.suffix in (".pt", ".bin", ".ckpt"):
        # Reading a pickle's keys means loading it; the Library does not do that. Guess from the name.
        return "embedding" if path.suffix in (".pt", ".bin") and path.stat().st_size < 1_000_000 else "unknown"
    return "unknown"


# Cross-attention width -> family: the text encoder's hidden size that every adapter's attn2 k/v reads.
# 32 is the built-in tiny model, SD 1.5's architecture at a narrow width.
_WIDTH_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl", 32: "sd1"}


def family_from_shapes(kind: str, shapes: dict[str, list[int]]) -> str:
    """'sd1', 'sd2', 'sdxl' or '' (unknown) for a LoRA, LyCORIS, embedding, EDLoRA, ControlNet or T2I-Adapter
    file, from its tensor names and shapes alone (a safetensors header): the width its cross-attention or
    text embedding has. Checkpoints are told apart by their keys (models/families.py)."""
    keys = list(shapes)
    if kind in ("lora", "lycoris", "edlora"):
        if any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys):
            return "sdxl"
        for k in keys:  # the down (A) matrix of an attn2 k/v projection reads the text width
            if re.search(r"attn2[._]to_[kv]", k) and re.search(r"(lora_down|lora_A|hada_w1_b|lora\.down)\.weight$", k):
                return _WIDTH_FAMILY.get(shapes[k][-1], "")
        return ""
    if kind == "embedding":
        if "clip_g" in shapes:
            return "sdxl"
        for k in ("emb_params", "string_to_param.*", *keys):
            if k in shapes and shapes[k]:
                return _WIDTH_FAMILY.get(shapes[k][-1], "")
        return ""
    if kind == "controlnet":
        for k in keys:
            if re.search(r"attn2\.to_k\.weight$", k):
                return _WIDTH_FAMILY.get(shapes[k][-1], "")
        return ""
    return ""


# -- kohya names ---------------------------------------------------------------------------------------

def kohya_unet_name(module_path: str) -> str:
    """`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` -> `lora_unet_down_blocks_0_..._to_q`."""
    return "lora_unet_" + module_path.replace(".", "_")


def kohya_te_name(module_path: str, index: int = 0, xl: bool = False) -> str:
    """Text-encoder module path (with or without `text_model.`) -> its kohya name.

    transformers 5 has no `.text_model` level, but every tool's file format keeps the `text_model_` segment.
    """
    path = module_path[len("text_model."):] if module_path.startswith("text_model.") else module_path
    prefix = f"lora_te{index + 1}_" if xl else "lora_te_"
    return prefix + "text_model_" + path.replace(".", "_")


def kohya_names_for(model, kind: str, index: int = 0, xl: bool = False) -> dict[str, str]:
    """{kohya name: module path} for every Linear/Conv2d in `model` (kind "unet" or "te").

    Going back from a kohya name to a module needs this table: underscores in the name are ambiguous."""
    import torch

    out = {}
    for path, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            name = kohya_unet_name(path) if kind == "unet" else kohya_te_name(path, index, xl)
            out[name] = path
    return out


def group_kohya(sd: dict) -> dict[str, dict]:
    """{module kohya name: {"lora_down.weight": t, "lora_up.weight": t, "alpha": t, ...}} for a kohya file."""
    groups: dict[str, dict] = defaultdict(dict)
    for key, value in sd.items():
        if not key.startswith(KOHYA_PREFIXES):
            continue
        module, _, rest = key.partition(".")
        groups[module][rest] = value
    return dict(groups)
