"""Mix-of-Show EDLoRA files (.pth) <-> ours (.safetensors), so concepts move between the two tools.

Mix-of-Show (TencentARC/Mix-of-Show, commit 51270fd5f9907cada8f416a4eff191a74f842660) saves, in train_edlora.py,
`torch.save({'params': EDLoRATrainer.delta_state_dict()})`:

    {'params': {
        'new_concept_embedding': {'<potter1>': (16, 768), '<potter2>': (16, 768)},    # one row per layer
        'text_encoder': {'text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight': (r, 768), ...up...},
        'unet': {'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_down.weight': ..., ...}}}

The LoRA names are the diffusers / transformers-4 module paths. No alpha is stored: Mix-of-Show's loaders
(convert_edlora, gradient_fusion.py) add `alpha * up @ down` with one alpha chosen when loading (1.0 while
training). Ours (formats/edlora.py) keeps `new_concept_embedding.<token>` rows and kohya-named LoRA tensors with a
per-module `.alpha` (scale = alpha / rank). Import sets that alpha to `alpha x rank`; export folds each module's
scale, divided by the alpha the user will load with, into `lora_up`, so both sides compute the same weights.

A .pth is a pickle: it is read with `torch.load(weights_only=True)`, which refuses anything but tensors and
plain containers, so a file cannot run code.
"""
from __future__ import annotations

import io
from pathlib import Path

from ..errors import UserError
from .edlora import EMB_PREFIX  # our EDLoRA files' embedding keys

MIXOFSHOW_COMMIT = "51270fd5f9907cada8f416a4eff191a74f842660"
PARTS = ("new_concept_embedding", "text_encoder", "unet")

# Module-path words that contain an underscore: kohya names replace every "." by "_", so going back needs them.
_JOINED = {"down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
           "proj_in", "proj_out", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj"}


def _dotted(name: str) -> str:
    """`down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0` -> `down_blocks.0.....attn1.to_out.0`."""
    words, out, i = name.split("_"), [], 0
    while i < len(words):
        pair = "_".join(words[i:i + 2])
        if pair in _JOINED:
            out.append(pair)
            i += 2
        else:
            out.append(words[i])
            i += 1
    return ".".join(out)


def kohya_to_module(kohya: str) -> tuple[str, str]:
    """Our kohya module name -> ("unet" | "text_encoder", the module path Mix-of-Show writes)."""
    if kohya.startswith("lora_unet_"):
        return "unet", _dotted(kohya[len("lora_unet_"):])
    if kohya.startswith("lora_te_text_model_"):
        return "text_encoder", "text_model." + _dotted(kohya[len("lora_te_text_model_"):])
    raise UserError(f"The LoRA module {kohya!r} has no Mix-of-Show name (only lora_unet_* and lora_te_* are "
                    "used by EDLoRA): export an EDLoRA file made by SD Studio.")


def module_to_kohya(part: str, path: str) -> str:
    """Mix-of-Show's module path in `part` -> our kohya name (transformers 4 and 5 text paths both work)."""
    if part == "unet":
        return "lora_unet_" + path.replace(".", "_")
    path = path[len("text_model."):] if path.startswith("text_model.") else path
    return "lora_te_text_model_" + path.replace(".", "_")


# -- reading -----------------------------------------------------------------------------------------------

def load_mixofshow(path: Path | str) -> dict:
    """The `params` dict of a Mix-of-Show .pth, loaded safely (weights_only=True) and checked."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist: check the path.")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        raise UserError(f"{path.name} could not be loaded safely as a Mix-of-Show file (weights_only=True refused "
                        f"it: {str(exc).splitlines()[0][:200]}); only plain tensor files are accepted.") from None
    params = obj.get("params", obj) if isinstance(obj, dict) else None
    if not isinstance(params, dict) or not isinstance(params.get("new_concept_embedding"), dict) \
            or not params["new_concept_embedding"]:
        raise UserError(f"{path.name} is not a Mix-of-Show EDLoRA file (no params/new_concept_embedding): use the "
                        "edlora_model-*.pth that Mix-of-Show's train_edlora.py writes.")
    for part in PARTS[1:]:
        if not isinstance(params.get(part, {}), dict):
            raise UserError(f"{path.name} has a '{part}' entry that is not a table of tensors: it is not a "
                            "Mix-of-Show EDLoRA file.")
    return params


def mixofshow_to_edlora(params: dict, alpha: float = 1.0, name: str = "file") -> dict:
    """Our EDLoRA tensors from Mix-of-Show params, loaded as Mix-of-Show would load them at `alpha`."""
    import torch

    if not alpha > 0:
        raise UserError(f"alpha = {alpha} must be above 0 (Mix-of-Show trains at 1.0).")
    out = {}
    layers = set()
    for token, rows in params["new_concept_embedding"].items():
        if not isinstance(rows, torch.Tensor) or rows.ndim != 2 or rows.shape[0] < 2:
            raise UserError(f"{name}: the embedding of {token} is not one row per cross-attention layer (a "
                            "Mix-of-Show plain LoRA, enable_edlora = false?): only EDLoRA files convert.")
        layers.add(rows.shape[0])
        out[EMB_PREFIX + token.lower()] = rows.detach().float().clone()  # CLIP lowercases prompts and tokens
    if len(layers) != 1:
        raise UserError(f"{name}: its concept embeddings have different layer counts {sorted(layers)}: the file is "
                        "damaged.")
    for part in PARTS[1:]:
        tensors = params.get(part) or {}
        for key, value in tensors.items():
            module, dot, rest = key.partition(".lora_")
            if not dot or rest not in ("down.weight", "up.weight") or not isinstance(value, torch.Tensor):
                raise UserError(f"{name}: {part} entry {key!r} is not a LoRA tensor (Mix-of-Show full fine-tuning "
                                "files are not EDLoRA files): only LoRA-trained EDLoRA files convert.")
            kohya = module_to_kohya(part, module)
            out[f"{kohya}.lora_{rest}"] = value.detach().float().clone()
    for key in [k for k in out if k.endswith(".lora_down.weight")]:
        kohya = key[:-len(".lora_down.weight")]
        if f"{kohya}.lora_up.weight" not in out:
            raise UserError(f"{name}: {kohya} has a lora_down but no lora_up: the file is damaged.")
        out[f"{kohya}.alpha"] = torch.tensor(float(alpha) * out[key].shape[0])
    return out


def import_mixofshow(src: Path | str, dst: Path | str, alpha: float = 1.0, base_model: str = "",
                     class_word: str = "") -> Path:
    """Write Mix-of-Show EDLoRA `src` (.pth) as our EDLoRA .safetensors `dst`; returns `dst`."""
    from .safe_io import save_safetensors

    src = Path(src)
    params = load_mixofshow(src)
    tensors = mixofshow_to_edlora(params, alpha, src.name)
    tokens = [k[len(EMB_PREFIX):] for k in tensors if k.startswith(EMB_PREFIX)]
    layers = next(v.shape[0] for k, v in tensors.items() if k.startswith(EMB_PREFIX))
    meta = {"sdstudio.method": "edlora", "sdstudio.concept_tokens": " ".join(tokens),
            "sdstudio.layers": str(layers), "sdstudio.class_word": class_word,
            "sdstudio.imported_from": f"mixofshow:{src.name}", "sdstudio.mixofshow_alpha": str(alpha)}
    if base_model:
        meta["sdstudio.base_model"] = base_model
    return save_safetensors(tensors, dst, meta)


# -- writing -----------------------------------------------------------------------------------------------

def edlora_to_mixofshow(tensors: dict, alpha: float = 1.0) -> dict:
    """Mix-of-Show `params` from our EDLoRA tensors, for loading at `alpha` (each module's scale folded in)."""
    if not alpha > 0:
        raise UserError(f"alpha = {alpha} must be above 0 (Mix-of-Show loads at 1.0 while training).")
    params: dict = {"new_concept_embedding": {}, "text_encoder": {}, "unet": {}}
    for key, value in tensors.items():
        if key.startswith(EMB_PREFIX):
            params["new_concept_embedding"][key[len(EMB_PREFIX):]] = value.detach().float().clone()
    if not params["new_concept_embedding"]:
        raise UserError("This file has no new_concept_embedding.* tensors: only EDLoRA files export to Mix-of-Show.")
    for key in tensors:
        if not key.endswith(".lora_down.weight"):
            continue
        kohya = key[:-len(".lora_down.weight")]
        down, up = tensors[key].float(), tensors[f"{kohya}.lora_up.weight"].float()
        scale = float(tensors[f"{kohya}.alpha"]) / down.shape[0] if f"{kohya}.alpha" in tensors else 1.0
        part, module = kohya_to_module(kohya)
        # Mix-of-Show's LoRALinearLayer keeps Linear (2-D) and 1x1-conv (4-D) weights as they are.
        params[part][f"{module}.lora_down.weight"] = down.clone()
        params[part][f"{module}.lora_up.weight"] = up * (scale / alpha)
    return params


def export_mixofshow(src: Path | str, dst: Path | str, alpha: float = 1.0) -> Path:
    """Write our EDLoRA .safetensors `src` as a Mix-of-Show .pth `dst` ({'params': ...}); returns `dst`."""
    import torch

    from .safe_io import atomic_write_bytes, load_state_dict

    src = Path(src)
    tensors = load_state_dict(src)
    if not any(k.startswith(EMB_PREFIX) for k in tensors):
        raise UserError(f"{src.name} is not an EDLoRA file (no new_concept_embedding.* tensors): train one with "
                        "method = 'edlora'.")
    buf = io.BytesIO()
    torch.save({"params": edlora_to_mixofshow(tensors, alpha)}, buf)
    return atomic_write_bytes(dst, buf.getvalue())

