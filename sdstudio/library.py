"""What is on disk in the workspace: models by kind (detected from tensor keys, not file names), runs and
outputs. The Library tab draws this; the CLI can print it."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .formats.kinds import detect_kind
from .workspace import Workspace

MODEL_SUFFIXES = (".safetensors", ".pt", ".bin", ".ckpt")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str
    path: str  # relative to the workspace
    size_mb: float
    family: str = ""
    metadata: dict = field(default_factory=dict, compare=False, hash=False)


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
    return ""


def scan_models(ws: Workspace) -> list[ModelEntry]:
    """Every model under workspace/models, classified by content. Diffusers folders count as one model."""
    out: list[ModelEntry] = []
    root = ws.root / "models"
    seen_dirs: set[Path] = set()
    for p in sorted(root.rglob("*")):
        if any(parent in seen_dirs for parent in p.parents):
            continue
        rel_parts = p.relative_to(root).parts
        if rel_parts and rel_parts[0] in ("annotators", "rembg", "captioners"):
            continue  # helper models, not something to mix or train from
        if p.is_dir():
            kind = detect_kind(p)
            if kind == "unknown":
                continue
            seen_dirs.add(p)
        elif p.suffix in MODEL_SUFFIXES and not p.name.startswith("."):
            kind = detect_kind(p)
        else:
            continue
        meta = _metadata(p)
        out.append(ModelEntry(name=p.stem if p.is_file() else p.name, kind=kind, path=ws.relative(p),
                              size_mb=round(_size_mb(p), 2), family=_family(kind, p, meta), metadata=meta))
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
        arts = tuple(ws.relative(p) for p in sorted(d.iterdir()) if p.suffix == ".safetensors")
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
