"""What is on disk in the workspace: models by kind (detected from tensor keys, not file names), runs and
outputs; and, read-only, the models of other apps given with --models-from (A1111, Forge, ComfyUI folders).
The Library tab draws this; every model picker lists its choices through `list_models`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .formats.kinds import ModelInfo, identify
from .models.folders import FOREIGN_DIRS, _walk, foreign_dirs
from .workspace import Workspace

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
HELPER_DIRS = ("annotators", "rembg", "captioners")  # helper models, not something to mix or train from

# A picker of one kind also lists the kinds it loads the same way.
PICKER_KINDS = {"checkpoint": ("checkpoint",), "lora": ("lora", "lycoris", "edlora"), "embedding": ("embedding",),
                "controlnet": ("controlnet",), "t2i_adapter": ("t2i_adapter",), "vae": ("vae",)}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str
    path: str  # relative to the workspace
    size_mb: float
    family: str = ""
    metadata: dict = field(default_factory=dict, compare=False, hash=False)
    source: str = "workspace"  # or the --models-from folder it was found in (read-only)


def _size_mb(p: Path) -> float:
    if p.is_file():
        return p.stat().st_size / 1e6
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e6


def _metadata(p: Path) -> dict:
    if p.suffix == ".safetensors":
        from .formats.safe_io import read_safetensors_metadata

        try:
            return read_safetensors_metadata(p)
        except Exception:
            return {}
    return {}


def _family(kind: str, p: Path, meta: dict) -> str:
    """sd1 / sd2 / sdxl from the file's own words (modelspec, ss_* keys), else from its tensors; '' unknown."""
    arch = meta.get("modelspec.architecture", "") or meta.get("ss_base_model_version", "")
    if arch:
        a = arch.lower()
        return "sdxl" if "xl" in a else "sd2" if ("v2" in a or "sd2" in a) else "sd1"
    if kind == "checkpoint":
        from .models.loading import family_of_ref

        try:
            return family_of_ref(str(p)).name
        except Exception:
            return ""
    if p.suffix == ".safetensors":
        from .formats.kinds import family_from_shapes
        from .formats.safe_io import read_safetensors_header

        try:
            return family_from_shapes(kind, read_safetensors_header(p)[0])
        except Exception:
            return ""
    if kind == "controlnet" and (p / "config.json").is_file():
        import json

        try:
            width = json.loads((p / "config.json").read_text()).get("cross_attention_dim")
        except (OSError, ValueError):
            return ""
        return {768: "sd1", 1024: "sd2", 2048: "sdxl", 32: "sd1"}.get(width, "")
    return ""


_DETECTED: dict[tuple, tuple[str, dict, str]] = {}  # (path, mtime, size) -> (kind, metadata, family)


def _describe(p: Path) -> tuple[str, dict, str]:
    """(kind, metadata, family) of a model file or folder, cached by path, mtime and size: the pickers list
    hundreds of --models-from files on every refresh, and a header read each time adds up."""
    try:
        st = p.stat()
    except OSError:
        return "unknown", {}, ""
    key = (str(p), st.st_mtime_ns, st.st_size)
    if key not in _DETECTED:
        info: ModelInfo = identify(p)
        kind = info.kind
        meta = _metadata(p) if kind != "unknown" else {}
        if len(_DETECTED) > 4096:
            _DETECTED.clear()
        _DETECTED[key] = (kind, meta, (_family(kind, p, meta) or info.family) if kind != "unknown" else "")
    return _DETECTED[key]




def _entry(p: Path, kind: str, meta: dict, family: str, path: str, source: str) -> ModelEntry:
    return ModelEntry(name=p.stem if p.is_file() else p.name, kind=kind, path=path, size_mb=round(_size_mb(p), 2),
                      family=family, metadata=meta, source=source)


def scan_models(ws: Workspace, roots=None) -> list[ModelEntry]:
    """Every model under workspace/models, classified by content (a diffusers folder counts as one), then those
    in the --models-from folders (`roots`; default: the ones the app was started with), read-only."""
    from .models.refs import models_from_roots

    out: list[ModelEntry] = []
    root = ws.root / "models"
    for sub in sorted(root.iterdir()) if root.is_dir() else []:
        if not sub.is_dir() or sub.name in HELPER_DIRS or sub.name.startswith("."):
            continue
        for p in _walk(sub):
            kind, meta, family = _describe(p)
            if kind != "unknown":
                out.append(_entry(p, kind, meta, family, ws.relative(p), "workspace"))
    for froot in models_from_roots() if roots is None else roots:
        seen: set[Path] = set()
        for folder_kind in FOREIGN_DIRS:
            for d in foreign_dirs(froot, folder_kind):
                for p in _walk(d):
                    if p in seen:
                        continue
                    seen.add(p)
                    kind, meta, family = _describe(p)
                    if kind != "unknown":
                        out.append(_entry(p, kind, meta, family, str(p), str(froot)))
    return out


def list_models(ws: Workspace, kind: str, roots=None) -> list[ModelEntry]:
    """The models a picker of `kind` offers ("checkpoint", "lora", "embedding", "controlnet", "t2i_adapter",
    "vae"): the workspace's, then those of the --models-from folders. The one source for every picker."""
    kinds = PICKER_KINDS.get(kind, (kind,))
    return [m for m in scan_models(ws, roots) if m.kind in kinds]


def model_choices(workspace=None) -> list[tuple[str, str]]:
    """(label, ref) pairs for a base-model picker: tiny first, then the checkpoints in the workspace and in the
    --models-from folders (list_models, the one source every picker uses)."""
    from .models.loading import TINY, TINY_SDXL
    from .models.tiny import TINY_LABEL, TINY_SDXL_LABEL

    out = [(TINY_LABEL, TINY), (TINY_SDXL_LABEL, TINY_SDXL)]
    if workspace is not None:
        for m in list_models(workspace, "checkpoint"):
            label = m.name if m.source == "workspace" else f"{m.name} ({Path(m.source).name})"
            out.append((label, str(workspace.root / m.path) if m.source == "workspace" else m.path))
    return out



@dataclass(frozen=True)
class RunEntry:
    name: str
    path: str
    method: str
    steps: int  # steps done (log.jsonl)
    last_loss: float | None
    checkpoints: int
    artefacts: tuple[str, ...]
    state: str = ""  # running | paused | stopped | failed | finished ("" for a run that never started training)
    total: int = 0  # steps asked for (max_steps)
    reason: str = ""  # why it failed (or why it counts as stopped)


def scan_runs(ws: Workspace) -> list[RunEntry]:
    """Every run folder with its state, steps done of total and last loss: a directory listing plus three small
    reads per run (config.toml, status.json, the end of log.jsonl)."""
    from .train.status import last_log_line, read_status

    out = []
    for d in sorted((ws.root / "runs").iterdir()) if (ws.root / "runs").is_dir() else []:
        if not d.is_dir():
            continue
        method, total = "", 0
        cfg = d / "config.toml"
        if cfg.is_file():
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            try:
                doc = tomllib.loads(cfg.read_text(encoding="utf-8"))
                method, total = doc.get("method", ""), int(doc.get("max_steps", 0) or 0)
            except Exception:
                method = "?"
        last = last_log_line(d / "log.jsonl")
        steps, loss = int(last.get("step", 0) or 0), last.get("loss")
        ckpts = len(list((d / "checkpoints").glob("step-*"))) if (d / "checkpoints").is_dir() else 0
        # model files, and the model folders a run writes (ControlNet, T2I-Adapter, a fine-tune's pipeline)
        arts = tuple(ws.relative(p) for p in sorted(d.iterdir()) if p.suffix == ".safetensors"
                     or p.is_dir() and ((p / "config.json").is_file() or (p / "model_index.json").is_file()))
        st = read_status(d)
        state, reason = st.get("state", ""), st.get("reason", "")
        total = int(st.get("total") or total)
        if not state and steps:  # a run from before status.json: judge by its log and files
            state = "finished" if total and steps >= total and arts else "stopped"
        out.append(RunEntry(d.name, ws.relative(d), method, steps, loss, ckpts, arts, state, total, reason))
    return out


def scan_outputs(ws: Workspace, limit: int = 200) -> list[Path]:
    files = [p for p in (ws.root / "outputs").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)[:limit]
