"""EDLoRA concept files (Mix-of-Show): layer-wise token embeddings plus a kohya-named LoRA, in one .safetensors.

- `new_concept_embedding.<token>`: (layers, dim) per concept token, one row per UNet cross-attention layer;
- `lora_te_*` / `lora_unet_*` `.lora_down.weight` / `.lora_up.weight` / `.alpha`: the LoRA, kohya names;
- metadata: `sdstudio.concept_tokens`, `sdstudio.class_word`, `sdstudio.layers`, `sdstudio.family`, ... plus ss_*.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

EMB_PREFIX = "new_concept_embedding."


@dataclass
class EDLoRAFile:
    path: Path
    embeddings: dict  # {token: (layers, dim)}
    lora: dict  # {kohya module name: {"lora_down.weight", "lora_up.weight", "alpha"}}
    meta: dict

    @property
    def tokens(self) -> list[str]:
        return list(self.embeddings)

    @property
    def layers(self) -> int:
        return next(iter(self.embeddings.values())).shape[0]

    def deltas(self, model, kind: str, weight: float = 1.0) -> dict:
        """{module path: weight change} for `model` ("te" or "unet"), alpha/rank applied per module."""
        from ..adapters import from_state
        from .kinds import kohya_names_for

        names = kohya_names_for(model, kind)
        out = {}
        for name, g in self.lora.items():
            if name not in names:
                continue
            w = model.get_submodule(names[name]).weight
            lora = from_state("lora", {"lora_down": g["lora_down.weight"].float(), "lora_up": g["lora_up.weight"].float()},
                              tuple(w.shape), float(g["alpha"]) if "alpha" in g else None)
            out[names[name]] = lora.delta(w) * weight
        return out


def concept_embeddings(sd: dict) -> dict:
    """{token: (layers, dim)} from an EDLoRA state dict (empty when it has none)."""
    return {k[len(EMB_PREFIX):]: v for k, v in sd.items() if k.startswith(EMB_PREFIX)}


def without_embeddings(sd: dict) -> dict:
    """The state dict's LoRA part (a plain kohya LoRA)."""
    return {k: v for k, v in sd.items() if not k.startswith(EMB_PREFIX)}


def edlora_state_dict(embeddings: dict, lora: dict) -> dict:
    """The tensors of an EDLoRA file: {token: (layers, dim)} embeddings plus kohya LoRA tensors."""
    return {**{EMB_PREFIX + t: rows for t, rows in embeddings.items()}, **lora}


def read_edlora(path: Path | str) -> EDLoRAFile:
    from .kinds import group_kohya
    from .safe_io import load_state_dict, read_safetensors_metadata

    path = Path(path)
    sd = load_state_dict(path)
    emb = concept_embeddings(sd)
    if not emb:
        raise UserError(f"{path.name} is not an EDLoRA file (it has no new_concept_embedding.* tensors): "
                        "train one with method = 'edlora'.")
    return EDLoRAFile(path, emb, group_kohya(sd), read_safetensors_metadata(path))
