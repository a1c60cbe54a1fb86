"""Import one model file (a checkpoint, LoRA, LyCORIS, embedding, EDLoRA, ControlNet, T2I-Adapter or VAE, as
A1111 and civitai users have them) into the workspace: check it, tell its kind and family from its tensors,
copy or hard-link it into models/<kind>/ through the one publisher, and record its size and sha256, with
A1111's short hash (civitai's "AutoV2") beside it so a civitai page can be matched. A file made for another
family than the base is imported and labelled, not refused.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..formats.safe_io import PICKLE_SUFFIXES
from ..workspace import MODEL_DIRS, Workspace, safe_name

HASHES_FILE = "settings/model-hashes.json"  # {workspace path: {size, mtime_ns, sha256}}
FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "": "unknown family"}
KIND_WORDS = {"lora": "LoRA", "lycoris": "LyCORIS", "embedding": "embedding", "edlora": "EDLoRA",
              "controlnet": "ControlNet", "t2i_adapter": "T2I-Adapter", "checkpoint": "checkpoint", "vae": "VAE"}


@dataclass(frozen=True)
class Facts:
    """What a model file is, from its header alone."""

    kind: str
    family: str  # sd1 | sd2 | sdxl | '' (cannot be told)
    size: int
    tensors: int
    metadata: dict


@dataclass(frozen=True)
class Imported:
    path: Path  # where it is in the workspace now
    kind: str
    family: str
    size: int
    sha256: str
    note: str = ""  # another family than the base; already imported

    @property
    def short_hash(self) -> str:
        return short_hash(self.sha256)

    def summary(self) -> str:
        line = (f"{KIND_WORDS.get(self.kind, self.kind)}, {FAMILY_LABELS.get(self.family, self.family)}, "
                f"{self.size / 1e6:,.1f} MB, sha256 {self.sha256}, A1111 short hash {self.short_hash}")
        return line + (f" ({self.note})" if self.note else "")


def short_hash(sha256: str) -> str:
    """A1111's short model hash (civitai's AutoV2): the first 10 hex digits of the file's sha256."""
    return sha256[:10]


def inspect_file(path: Path | str) -> Facts:
    """Check a model file and tell what it is. Raises one sentence for a pickle, a damaged or cut-off file, or
    tensors of no kind we load."""
    from ..formats.kinds import detect_kind_from_keys, family_from_shapes
    from ..formats.safe_io import read_safetensors_header

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path.name} is not a file: pick a .safetensors model file.")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"{path.name} is a pickle ({path.suffix}), which can run code when loaded: SD Studio imports "
                        f".safetensors only; download the .safetensors version of this model instead.")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path.name} is not a .safetensors model file: pick a checkpoint, LoRA, embedding, "
                        f"ControlNet or VAE in that format.")
    shapes, meta = read_safetensors_header(path)
    kind = detect_kind_from_keys(shapes)
    if kind == "unknown":
        raise UserError(f"{path.name} holds no checkpoint, LoRA, LyCORIS, embedding, ControlNet, T2I-Adapter or VAE "
                        f"weights that SD Studio knows: check that it is a Stable Diffusion model file.")
    if kind == "checkpoint":
        from .families import detect_family_from_keys

        family = detect_family_from_keys(shapes).name
    else:
        family = family_from_shapes(kind, shapes) or _family_from_metadata(meta)
    return Facts(kind, family, path.stat().st_size, len(shapes), meta)


def _family_from_metadata(meta: dict) -> str:
    arch = (meta.get("modelspec.architecture", "") or meta.get("ss_base_model_version", "")).lower()
    if not arch:
        return ""
    return "sdxl" if "xl" in arch else "sd2" if ("v2" in arch or "sd2" in arch) else "sd1"


def known_hash(ws: Workspace, path: Path) -> str | None:
    """The sha256 recorded for a workspace file, while its size and mtime are unchanged."""
    try:
        entry = _hashes(ws).get(ws.relative(path))
        st = Path(path).stat()
    except OSError:
        return None
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return entry.get("sha256")
    return None


def _hashes(ws: Workspace) -> dict:
    try:
        return json.loads((ws.root / HASHES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def remember_hash(ws: Workspace, path: Path, sha256: str) -> None:
    from ..formats.safe_io import atomic_write_text

    data = _hashes(ws)
    st = Path(path).stat()
    data[ws.relative(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
    atomic_write_text(ws.root / HASHES_FILE, json.dumps(data, indent=1, sort_keys=True))


def _target_name(folder: Path, src: Path, sha256: str, ws: Workspace) -> tuple[str, Path | None]:
    """(the file name to import as, an identical file already there or None): a clash with a different file
    gets -2, -3... rather than replacing it."""
    stem, suffix = src.stem, src.suffix.lower()
    name = f"{safe_name(stem)}{suffix}"
    for k in range(2, 1000):
        existing = folder / name
        if not existing.exists():
            return name, None
        if existing.stat().st_size == src.stat().st_size:
            from .hub import file_sha256

            if (known_hash(ws, existing) or file_sha256(existing)) == sha256:
                return name, existing
        name = f"{safe_name(stem)}-{k}{suffix}"
    raise UserError(f"models/ already holds too many files named {stem}: rename the file first.")


def import_file(ws: Workspace, src: Path | str, *, link: bool = False, base_family: str = "", name: str = "",
                emit=None, check=None) -> Imported:
    """Check `src`, hash it (progress through `emit`, Stop through `check`), and publish it into models/<kind>/
    (hard-linked when `link` and the filesystem allows). `name`: the file name to use (an upload's original
    name). `base_family`: the family of the base the user works with, to label a file for another one."""
    from ..events import Progress, Saved, Status
    from ..publish import publish
    from .hub import file_sha256

    src = Path(src)
    facts = inspect_file(src)
    if emit is not None:
        emit(Status(f"checked {name or src.name}: {KIND_WORDS[facts.kind]}, {FAMILY_LABELS.get(facts.family, '')}, "
                    f"{facts.tensors} tensors; hashing", stage="import"))
    done = [0]

    def on_bytes(n: int) -> None:
        done[0] += n
        if emit is not None:
            emit(Progress(done[0], facts.size, stage="import", message=f"sha256 of {name or src.name}"))

    sha = file_sha256(src, check, on_bytes)
    folder = ws.root / MODEL_DIRS[facts.kind]
    as_name, same = _target_name(folder, Path(name) if name else src, sha, ws)
    note = ""
    if same is not None:
        target, note = same, "already in the Library: nothing copied"
    else:
        target = publish(ws, [src], kind=facts.kind, link=link, names={src: as_name})[0]
    remember_hash(ws, target, sha)
    if base_family and facts.family and facts.family != base_family:
        other = (f"made for {FAMILY_LABELS.get(facts.family)}, not for the {FAMILY_LABELS.get(base_family)} "
                 f"base: use it with a {FAMILY_LABELS.get(facts.family)} base")
        note = f"{note}; {other}" if note else other
    if emit is not None:
        emit(Saved(str(target), kind="published"))
    return Imported(target, facts.kind, facts.family, facts.size, sha, note)


def import_work(ws: Workspace, src: Path | str, *, link: bool = False, base_family: str = "", name: str = ""):
    """The Job work of an import: the Library's Import button and `sdstudio import` run it."""
    def work(ctx):
        from ..events import Finished

        result = import_file(ws, src, link=link, base_family=base_family, name=name, emit=ctx.emit,
                             check=ctx.commands.check)
        ctx.emit(Finished(message=f"{ws.relative(result.path)}: {result.summary()}", outputs=(str(result.path),)))
        return result

    return work


def hashes_known(ws: Workspace) -> dict[str, str]:
    """{workspace path: sha256} for the files whose recorded hash still matches them (the Library shows these)."""
    out = {}
    for rel, entry in _hashes(ws).items():
        p = ws.root / rel
        try:
            st = p.stat()
        except OSError:
            continue
        if entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            out[rel] = entry.get("sha256", "")
    return out
