"""Textual-inversion embeddings in every format users have, read and written.

- A1111 .pt: {"string_to_token": {"*": 265}, "string_to_param": {"*": tensor[n, dim]}, "name": ..., "step": ...}
  (a pickle, read as ComfyUI does: torch.load(weights_only=True), which builds tensors and plain data and runs
  no code; see `read_embedding_state` for the few files that need the opt-in);
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
        return _checked(Embedding([_as_2d(sd["clip_l"]).float(), _as_2d(sd["clip_g"]).float()], token), file_name)
    if "emb_params" in sd:
        return _checked(Embedding([_as_2d(sd["emb_params"]).float()], token), file_name)
    if "string_to_param" in sd:
        params = sd["string_to_param"]
        if isinstance(params, torch.nn.ParameterDict):  # the original textual-inversion code's .pt files
            params = dict(params.items())
        if not isinstance(params, dict) or not params:
            raise UserError(f"{file_name} has an empty string_to_param: it is not a usable embedding.")
        tensor = next(iter(params.values()))
        name = sd.get("name")
        if isinstance(name, str) and name and not token:
            token = f"<{name}>"
        return _checked(Embedding([_as_2d(tensor).float()], token), file_name)
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:  # diffusers learned_embeds: {"<token>": tensor}
        key, tensor = next(iter(tensors.items()))
        return _checked(Embedding([_as_2d(tensor).float()], token or key), file_name)
    raise UserError(f"{file_name} is not a textual-inversion embedding (no emb_params, string_to_param, "
                    f"clip_l/clip_g or single token): check the file.")


def _weights_only_globals(allow_pickle: bool) -> list:
    """What the weights_only unpickler may build besides tensors and plain data. By default one class: the
    ParameterDict the original textual-inversion code saved `string_to_param` as (its own __setstate__, no
    user code). With the opt-in, also numpy arrays and scalars, which some trainers saved (a `step` as
    numpy.int64): numpy rebuilds them from bytes, still without running anything from the file."""
    import numpy as np
    import torch

    allowed: list = [torch.nn.ParameterDict]
    if allow_pickle:
        multiarray = getattr(np, "_core", np.core).multiarray
        allowed += [np.ndarray, np.dtype, (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
                    (multiarray.scalar, "numpy.core.multiarray.scalar"), multiarray._reconstruct, multiarray.scalar]
        allowed += [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool")]
    return allowed


def read_embedding_state(path: Path | str, allow_pickle: bool = False) -> dict:
    """The tensors of an embedding file. `.safetensors` as always. A pickle (`.pt`, `.bin`) is read by default
    with torch.load(weights_only=True), as ComfyUI does: it builds tensors, numbers, strings and dicts and
    never runs code from the file, so A1111's and the original textual-inversion's .pt files load without
    asking. Only files that pickle numpy values need the opt-in (allow_pickle / --allow-pickle), and even then
    nothing from the file runs: a file that wants any other Python object (a custom class, a function such as
    os.system) is refused, naming it."""
    path = Path(path)
    if path.suffix not in (".pt", ".bin"):
        return load_state_dict(path, allow_pickle=allow_pickle)
    if not path.is_file():
        raise UserError(f"{path} does not exist: check the path.")
    import pickle

    import torch

    import warnings

    try:
        with torch.serialization.safe_globals(_weights_only_globals(allow_pickle)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol 4": the refusal below says what matters
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        wanted = _unsupported_global(str(exc))
        if wanted.startswith("numpy.") and not allow_pickle:
            raise UserError(f"{path.name} stores numpy values ({wanted}), which are read only on request: opt in "
                            f"with --allow-pickle (nothing in the file runs), or convert it to .safetensors.") from None
        if wanted:
            raise UserError(f"{path.name} asks to run or build {wanted} when loaded, which an embedding never "
                            f"needs: it is refused; get the .safetensors version of it.") from None
        raise UserError(f"{path.name} is a pickle the safe loader cannot read (weights_only refused it): get the "
                        f".safetensors version of it.") from None
    except Exception as exc:  # a truncated or corrupt file
        raise UserError(f"{path.name} is not a readable embedding ({type(exc).__name__}): re-download it, or use "
                        f"its .safetensors version.") from None
    if not isinstance(sd, dict):
        raise UserError(f"{path.name} holds a {type(sd).__name__}, not an embedding's tensors: check the file.")
    return sd


def _unsupported_global(message: str) -> str:
    """The `module.name` torch's weights_only unpickler refused, from its message."""
    import re

    m = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"Unsupported global: ([\w.]+)", message)
    return m[1] if m else ""


def _checked(emb: Embedding, file_name: str) -> Embedding:
    """Vectors with values, all finite: an empty or NaN embedding would silently break every prompt using it."""
    from .safe_io import check_tensors

    check_tensors({f"vectors[{i}]": v for i, v in enumerate(emb.vectors)}, file_name)
    return emb


def load_embedding(path: Path | str, allow_pickle: bool = False, token: str = "") -> Embedding:
    """Read any supported embedding file. The token defaults to the file's own name, else <file stem>."""
    path = Path(path)
    sd = read_embedding_state(path, allow_pickle=allow_pickle)
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
    """{token: rows (n, dim), or [clip_l, clip_g] rows for SDXL} -> the keys A1111 reads from a LoRA file that
    carries its word (its network loader hands `bundle_emb.<token>.*` to the embedding reader, which takes
    string_to_param or SDXL's clip_l/clip_g)."""
    out = {}
    for token, rows in embeddings.items():
        if isinstance(rows, (list, tuple)):
            out[f"{BUNDLE_PREFIX}{token}.clip_l"], out[f"{BUNDLE_PREFIX}{token}.clip_g"] = rows
        else:
            out[f"{BUNDLE_PREFIX}{token}.string_to_param.*"] = rows
    return out


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
