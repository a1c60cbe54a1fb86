"""What a model file is (`identify`: kind, family, format and adapter algorithms, as typed data, from its
header alone), and the kohya/A1111 module names every LoRA tool uses.

The Library tab lists files by kind and family; loaders pick their path by kind; savers name modules so that
A1111 and ComfyUI recognise them (see DESIGN.md, "LoRA file names that A1111 and ComfyUI recognise").
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

KINDS = ("lora", "lycoris", "embedding", "edlora", "gligen", "controlnet", "t2i_adapter", "checkpoint", "vae",
         "unknown")

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
LYCORIS_SUFFIXES = (".hada_w1_a", ".hada_w1_b", ".lokr_w1", ".lokr_w1_a", ".lokr_w2", ".lokr_w2_a")
LYCORIS_OTHER = (".oft_blocks", ".oft_diag", ".oft_R", ".a1.weight", ".b1.weight", ".diff", ".diff_b", ".w_norm",
                 ".on_input")


@dataclass(frozen=True)
class ModelInfo:
    """What a model file (or diffusers folder) is, as typed data: the Library lists it, loaders pick their path
    by it, publishing files it under models/<kind>/.

    kind: one of KINDS. family: "sd1", "sd2", "sdxl", or "" when the file does not tell. format: how it is
    written (see FORMATS). algorithms: for adapters, what their modules are ("lora", "loha", "lokr", "dora")."""

    kind: str
    family: str = ""
    format: str = ""
    algorithms: tuple[str, ...] = ()


@dataclass(frozen=True)
class FileFormat:
    """One way a model file is written (InvokeAI keeps a config class per format; this is that, small): the kind it
    holds, its name, and a test on its tensor names. FORMATS tries them in order, most specific first."""

    kind: str
    format: str
    matches: Callable[[list[str]], bool]


def _any(keys, pred) -> bool:
    return any(pred(k) for k in keys)


def _is_gligen(keys) -> bool:
    from .gligen import is_gligen_keys

    return is_gligen_keys(keys)


_LYCORIS = lambda k: k.endswith(LYCORIS_SUFFIXES)  # noqa: E731
_KOHYA = lambda k: k.startswith(KOHYA_PREFIXES)  # noqa: E731
_LORA = lambda k: ".lora_down." in k or ".lora_up." in k  # noqa: E731
_PEFT_LORA = lambda k: ".lora_A." in k or ".lora_B." in k  # noqa: E731

FORMATS = (
    FileFormat("edlora", "sdstudio-edlora", lambda ks: _any(ks, lambda k: k.startswith("new_concept_embedding."))),
    FileFormat("edlora", "edlora", lambda ks: _any(ks, lambda k: k.startswith("edlora."))),
    # A GLIGEN module alone, in the layout ComfyUI loads (a full GLIGEN checkpoint is a checkpoint).
    FileFormat("gligen", "module", lambda ks: not _any(ks, lambda k: k.startswith(
        ("model.diffusion_model.", "first_stage_model."))) and _is_gligen(ks)),
    FileFormat("lycoris", "kohya", lambda ks: _any(ks, lambda k: _LYCORIS(k) and _KOHYA(k))),
    FileFormat("lycoris", "peft", lambda ks: _any(ks, _LYCORIS)),
    # A LoRA with DoRA's magnitude is LyCORIS' dora_wd (kohya names) or peft's use_dora.
    FileFormat("lycoris", "kohya", lambda ks: _any(ks, lambda k: k.endswith(".dora_scale")) and _any(ks, _LORA)),
    FileFormat("lycoris", "peft", lambda ks: _any(ks, lambda k: ".lora_magnitude_vector" in k)),
    # LyCORIS algorithms the adapter runtime has no maths for (OFT, BOFT, GLoRA, full, norms, IA3): still
    # LyCORIS files, so the loader can say which algorithm it cannot apply.
    FileFormat("lycoris", "kohya", lambda ks: _any(ks, lambda k: _KOHYA(k) and k.endswith(LYCORIS_OTHER))),
    FileFormat("lora", "kohya", lambda ks: _any(ks, lambda k: _LORA(k) and _KOHYA(k))),
    FileFormat("lora", "diffusers", lambda ks: _any(ks, lambda k: _LORA(k) or ".lora.down." in k)),
    FileFormat("lora", "peft", lambda ks: _any(ks, _PEFT_LORA)),
    FileFormat("embedding", "sdxl", lambda ks: bool({"clip_l", "clip_g"} & set(ks))),
    FileFormat("embedding", "a1111", lambda ks: _any(ks, lambda k: k == "emb_params" or k.startswith("string_to_param"))),
    # diffusers learned_embeds: {"<token>": tensor}
    FileFormat("embedding", "diffusers", lambda ks: len(ks) == 1 and ks[0].startswith("<") and ks[0].endswith(">")),
    # A VAE saved with its checkpoint prefix, before the checkpoint that has the same prefix among others.
    FileFormat("vae", "ldm", lambda ks: bool(ks) and all(k.startswith("first_stage_model.") for k in ks)),
    FileFormat("checkpoint", "ldm", lambda ks: _any(ks, lambda k: k.startswith(
        ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.")))),
    # A1111's VAE files (vae-ft-mse-840000-ema-pruned) and diffusers AutoencoderKL weights.
    FileFormat("vae", "diffusers", lambda ks: _any(ks, lambda k: k.startswith("encoder.")) and _any(
        ks, lambda k: k.startswith("decoder.")) and _any(ks, lambda k: k.startswith(("quant_conv.", "post_quant_conv.")))),
    # ControlNet 1.0 (prefixed control_model.) and 1.1 (bare input_hint_block./zero_convs.) original layouts.
    FileFormat("controlnet", "ldm", lambda ks: _any(ks, lambda k: k.startswith(
        ("control_model.", "input_hint_block.", "zero_convs.")))),
    FileFormat("controlnet", "diffusers", lambda ks: _any(ks, lambda k: k.startswith("controlnet_cond_embedding."))),
    FileFormat("t2i_adapter", "diffusers", lambda ks: _any(ks, lambda k: k.startswith(("adapter.", "body.")))
               and not _any(ks, lambda k: "conv_in" in k)),
)


def _algorithms(keys) -> tuple[str, ...]:
    found = []
    for name, pred in (("lora", lambda k: _LORA(k) or _PEFT_LORA(k) or ".lora.down." in k),
                       ("loha", lambda k: ".hada_w" in k), ("lokr", lambda k: ".lokr_w" in k),
                       ("dora", lambda k: k.endswith(".dora_scale") or ".lora_magnitude_vector" in k)):
        if _any(keys, pred):
            found.append(name)
    return tuple(found)


# Cross-attention (text) width -> family; 32 is the built-in tiny model, SD 1.5's architecture at a narrow width.
_WIDTH_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl", 32: "sd1"}


def family_from_shapes(kind: str, shapes: dict) -> str:
    """'sd1', 'sd2', 'sdxl' or '' (the file does not tell) from tensor names and shapes alone (a safetensors
    header): two text encoders mean SDXL; otherwise the text width a cross-attention key/value projection reads,
    or an embedding's width."""
    keys = list(shapes)
    if _any(keys, lambda k: k.startswith(("lora_te1_", "lora_te2_", "conditioner.embedders.", "text_encoder_2."))) or \
            "clip_g" in shapes:
        return "sdxl"
    if kind == "checkpoint":
        if _any(keys, lambda k: k.startswith("cond_stage_model.model.")):
            return "sd2"
        return "sd1" if _any(keys, lambda k: k.startswith("cond_stage_model.transformer.")) else ""
    if kind in ("lora", "lycoris", "edlora", "controlnet"):
        for k, shape in shapes.items():  # the down (A) matrix of an attn2 k/v projection reads the text width
            if len(shape) >= 2 and (re.search(r"attn2[._]to_[kv]", k) and re.search(
                    r"(lora_down|lora_A|hada_w1_b|lora\.down)\.weight$|hada_w1_b$", k) or
                    kind == "controlnet" and re.search(r"attn2\.to_k\.weight$", k)):
                return _WIDTH_FAMILY.get(shape[-1], "")
    if kind in ("embedding", "edlora"):
        for k in ("emb_params", *(k for k in keys if k.startswith("string_to_param")), *keys):
            if k in shapes and shapes[k] and k != "clip_g":
                return _WIDTH_FAMILY.get(shapes[k][-1], "")
    return ""


def identify_keys(keys, shapes: dict[str, tuple] | None = None, metadata: dict | None = None) -> ModelInfo:
    """What a state dict is, from its tensor names (and, when given, shapes and safetensors metadata)."""
    keys = list(keys)
    fmt = next((f for f in FORMATS if f.matches(keys)), None)
    if fmt is None:
        return ModelInfo("unknown")
    family = _family_from_metadata(metadata or {}) or family_from_shapes(fmt.kind, shapes or {})
    algorithms = _algorithms(keys) if fmt.kind in ("lora", "lycoris", "edlora") else ()
    return ModelInfo(fmt.kind, family, fmt.format, algorithms)


def _family_from_metadata(meta: dict) -> str:
    arch = (meta.get("modelspec.architecture", "") or meta.get("ss_base_model_version", "")).lower()
    if not arch:
        return meta.get("sdstudio.family", "")
    return "sdxl" if "xl" in arch else "sd2" if ("v2" in arch or "sd2" in arch) else "sd1"


def detect_kind_from_keys(keys) -> str:
    """The kind of a state dict by its keys (identify_keys(...).kind)."""
    return identify_keys(keys).kind


def identify(path: Path | str) -> ModelInfo:
    """What a model file or diffusers folder on disk is, reading only headers and configs."""
    from .safe_io import read_safetensors_header

    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return ModelInfo("checkpoint", format="diffusers")
        cfg = path / "config.json"
        if cfg.is_file():
            try:
                name = json.loads(cfg.read_text()).get("_class_name", "")
            except (OSError, json.JSONDecodeError):
                return ModelInfo("unknown")
            if "ControlNet" in name:
                return ModelInfo("controlnet", format="diffusers")
            if "Adapter" in name:
                return ModelInfo("t2i_adapter", format="diffusers")
        return ModelInfo("unknown")
    if path.suffix == ".safetensors":
        try:
            shapes, meta = read_safetensors_header(path)
        except Exception:
            return ModelInfo("unknown")
        return identify_keys(shapes.keys(), shapes, meta)
    if path.suffix in (".pt", ".bin", ".ckpt"):
        # Reading a pickle's keys means loading it; the Library does not do that. Guess from the name.
        small = path.suffix in (".pt", ".bin") and path.stat().st_size < 1_000_000
        return ModelInfo("embedding", format="a1111-pt") if small else ModelInfo("unknown")
    return ModelInfo("unknown")


def detect_kind(path: Path | str) -> str:
    """The kind of a model file or diffusers folder (identify(path).kind): "lora", "lycoris", "embedding", ..."""
    return identify(path).kind


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
            path = path.replace(".base_layer", "")  # a layer the adapter runtime wraps answers to its own path
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
