"""Textual-inversion embeddings in every format users have, read and written.

- A1111 .pt: {"string_to_token": {"*": 265}, "string_to_param": {"*": tensor[n, dim]}, "name": ..., "step": ...}
  (a pickle: read only on opt-in, and then with weights_only=True);
- A1111 / civitai .safetensors: {"emb_params": tensor[n, dim]};
- diffusers learned_embeds: {"<token>": tensor[dim] or [n, dim]};
- SDXL: {"clip_l": tensor[n, 768], "clip_g": tensor[n, 1280]}.
n > 1 is a multi-vector embedding: the token stands for n tokens in the prompt.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .safe_io import atomic_write_bytes, load_state_dict, save_safetensors


@dataclass
class Embedding:
    vectors: list  # one tensor[n, dim] per text encoder (SD1/2: one; SDXL: clip_l then clip_g)
    token: str  # the trigger the file suggests ("<name>")

    @property
    def num_vectors(self) -> int:
        return int(self.vectors[0].shape[0])


def _as_2d(t):
    return t.reshape(1, -1) if t.ndim == 1 else t.reshape(-1, t.shape[-1])


def embedding_from_state(sd: dict, file_name: str = "embedding", default_token: str = "") -> Embedding:
    import torch

    token = default_token
    if "clip_l" in sd and "clip_g" in sd:
        return Embedding([_as_2d(sd["clip_l"]).float(), _as_2d(sd["clip_g"]).float()], token)
    if "emb_params" in sd:
        return Embedding([_as_2d(sd["emb_params"]).float()], token)
    if "string_to_param" in sd:
        params = sd["string_to_param"]
        if not isinstance(params, dict) or not params:
            raise UserError(f"{file_name} has an empty string_to_param: it is not a usable embedding.")
        tensor = next(iter(params.values()))
        name = sd.get("name")
        if isinstance(name, str) and name and not token:
            token = f"<{name}>"
        return Embedding([_as_2d(tensor).float()], token)
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:  # diffusers learned_embeds: {"<token>": tensor}
        key, tensor = next(iter(tensors.items()))
        return Embedding([_as_2d(tensor).float()], token or key)
    raise UserError(f"{file_name} is not a textual-inversion embedding (no emb_params, string_to_param, "
                    f"clip_l/clip_g or single token): check the file.")


def load_embedding(path: Path | str, allow_pickle: bool = False, token: str = "") -> Embedding:
    """Read any supported embedding file. The token defaults to the file's own name, else <file stem>."""
    path = Path(path)
    sd = load_state_dict(path, allow_pickle=allow_pickle)
    emb = embedding_from_state(sd, path.name, token)
    if not emb.token:
        emb.token = f"<{path.stem}>"
    if token:
        emb.token = token
    return emb


def save_embedding(path: Path | str, vectors, token: str, *, fmt: str | None = None, step: int = 0,
                   metadata: dict | None = None) -> Path:
    """Write an embedding atomically. `vectors` is a tensor[n, dim] (SD1/2) or a list [clip_l, clip_g] (SDXL).

    fmt: "a1111" (.safetensors emb_params, or clip_l/clip_g for SDXL: what A1111 and ComfyUI load), "pt"
    (A1111's pickle layout, for old tools), "diffusers" ({token: tensor}, learned_embeds). By default it follows
    the suffix: .pt -> "pt", else "a1111"."""
    import torch

    path = Path(path)
    vecs = list(vectors) if isinstance(vectors, (list, tuple)) else [vectors]
    vecs = [_as_2d(v.detach().float().cpu()).contiguous() for v in vecs]
    fmt = fmt or ("pt" if path.suffix == ".pt" else "a1111")
    name = token.strip("<>") or path.stem
    if fmt == "pt":
        if len(vecs) != 1:
            raise UserError("The .pt embedding format holds one text encoder only: save SDXL embeddings as "
                            ".safetensors.")
        payload = {"string_to_token": {"*": 265}, "string_to_param": {"*": vecs[0]}, "name": name, "step": int(step),
                   "sd_checkpoint": None, "sd_checkpoint_name": None}
        buf = io.BytesIO()
        torch.save(payload, buf)
        return atomic_write_bytes(path, buf.getvalue())
    if fmt == "diffusers":
        if len(vecs) != 1:
            raise UserError("The diffusers learned_embeds format holds one text encoder only: use fmt='a1111'.")
        return save_safetensors({token: vecs[0]}, path, metadata)
    if fmt != "a1111":
        raise UserError(f"Unknown embedding format {fmt!r}: use a1111, pt or diffusers.")
    tensors = {"emb_params": vecs[0]} if len(vecs) == 1 else {"clip_l": vecs[0], "clip_g": vecs[1]}
    return save_safetensors(tensors, path, {"name": name, "step": str(step), **(metadata or {})})


# -- embeddings bundled in a LoRA file (A1111: `bundle_emb.<token>.string_to_param.*`) ----------------------

BUNDLE_PREFIX = "bundle_emb."


def bundle_state_dict(embeddings: dict) -> dict:
    """{token: rows (n, dim)} -> the keys A1111 reads from a LoRA file that carries its word."""
    return {f"{BUNDLE_PREFIX}{token}.string_to_param.*": rows for token, rows in embeddings.items()}


def without_bundle(sd: dict) -> dict:
    """A LoRA state dict without its bundled embeddings."""
    return {k: v for k, v in sd.items() if not k.startswith(BUNDLE_PREFIX)}


def bundled_embeddings(sd: dict) -> dict:
    """{token: rows (n, dim)} from a LoRA file's `bundle_emb.*` keys (A1111's layout, which its network loader
    reads; sd-scripts neither writes nor reads it; SDXL: clip_l)."""
    out = {}
    for k, v in sd.items():
        if not k.startswith(BUNDLE_PREFIX):
            continue
        name, _, rest = k[len(BUNDLE_PREFIX):].partition(".")
        if rest.startswith("string_to_param") or rest in ("emb_params", "clip_l"):
            out[name] = v.reshape(-1, v.shape[-1]).float()
    return out
