"""Where model files are on disk, found by folder and header alone: the workspace's models/<kind>/ folders and the
folders other apps keep each kind in (--models-from). A floor below the Library (library.py, which classifies
and lists them) and the model-reference rule (models/refs.py, which looks names up here)."""
from __future__ import annotations

from pathlib import Path

from ..formats.kinds import identify

MODEL_SUFFIXES = (".safetensors", ".pt", ".bin", ".ckpt")

# The folders other apps keep each kind in, matched case-insensitively under DIR, DIR/models and (when DIR is
# itself a models folder) its parent: A1111/Forge use models/Stable-diffusion, models/Lora, models/LyCORIS,
# embeddings/ beside models/, models/ControlNet, models/VAE; ComfyUI uses models/checkpoints, models/loras,
# models/embeddings, models/controlnet (and t2i_adapter), models/vae, models/diffusers.
FOREIGN_DIRS = {
    "checkpoint": ("stable-diffusion", "checkpoints", "diffusers"),
    "lora": ("lora", "lycoris", "loras"),
    "embedding": ("embeddings",),
    "controlnet": ("controlnet", "t2i_adapter"),
    "vae": ("vae",),
}


def _walk(root: Path):
    """Model files and model folders under root, a diffusers folder counting as one; hidden entries (partial
    downloads, temporary files) skipped."""
    try:
        children = sorted(root.iterdir())
    except OSError:
        return
    for p in children:
        if p.name.startswith("."):
            continue
        if p.is_dir():
            if identify(p).kind != "unknown":
                yield p
            else:
                yield from _walk(p)
        elif p.suffix in MODEL_SUFFIXES:
            yield p


def foreign_dirs(root: Path, kind: str) -> list[Path]:
    """The folders of `kind` in another app's models folder (see FOREIGN_DIRS)."""
    root = Path(root)
    bases = [root, root / "models"] + ([root.parent] if root.name.lower() == "models" else [])
    out: list[Path] = []
    for base in bases:
        try:
            children = sorted(base.iterdir())
        except OSError:
            continue
        for child in children:
            if child.is_dir() and child.name.lower() in FOREIGN_DIRS.get(kind, ()) and child.resolve() not in out:
                out.append(child.resolve())
    return out


def list_model_paths(workspace_root, kind: str, roots=()) -> list[Path]:
    """The paths of the models of `kind` in the workspace and in `roots`, found by folder without reading any
    file: what a model reference by name is looked up in (models/refs.py)."""
    from ..workspace import MODEL_DIRS

    folders = [Path(workspace_root) / MODEL_DIRS[kind]] if workspace_root is not None and kind in MODEL_DIRS else []
    for froot in roots:
        folders += foreign_dirs(froot, kind)
    out: list[Path] = []
    for folder in folders:
        out += [p for p in _walk(folder) if p.suffix in (".safetensors", "") or p.is_dir()]
    return out
