"""Numbered artefacts, as kohya and A1111 users know them: `name-000020.safetensors` is `name` at step 20.

- A run saves a numbered copy of its artefacts at every periodic checkpoint (`numbered_name`).
- A final file is never overwritten without keeping the previous one: `keep_previous` first renames the old
  file to its own numbered name (the step read from its `ss_steps` metadata), so "Train again" leaves both.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

_NUMBERED = re.compile(r"-(\d{6})$")


def numbered_name(name: str, stem: str, step: int) -> str:
    """`mira.safetensors` -> `mira-000020.safetensors`; the number goes right after the run's output stem, so
    `mira.learned_embeds.safetensors` -> `mira-000020.learned_embeds.safetensors`."""
    if stem and name.startswith(stem):
        return f"{stem}-{step:06d}{name[len(stem):]}"
    base, dot, ext = name.partition(".")
    return f"{base}-{step:06d}{dot}{ext}"


def step_of(path: Path) -> int | None:
    """The training step a file was saved at: its `ss_steps` metadata, else a `-NNNNNN` in its name."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        from .safe_io import read_safetensors_metadata

        try:
            steps = read_safetensors_metadata(path).get("ss_steps")
            if steps and str(steps).isdigit():
                return int(steps)
        except Exception:
            pass
    m = _NUMBERED.search(path.name.split(".")[0])
    return int(m[1]) if m else None


def same_content(a: Path, b: Path) -> bool:
    """Byte-identical files, or folders holding the same byte-identical files (a retrained ControlNet folder has
    the same names and sizes as the last one, so sizes alone would keep the old weights)."""
    a, b = Path(a), Path(b)
    if a.is_dir() or b.is_dir():
        if not (a.is_dir() and b.is_dir()):
            return False
        fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
        return fa == fb and all(same_content(a / rel, b / rel) for rel in fa)
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def keep_previous(target: Path, stem: str = "") -> Path | None:
    """Before `target` is replaced: rename the file (or folder) there to its numbered name and return where it
    went; None when there was nothing to keep. A numbered file that already exists (the same step saved
    earlier) is the same model, so the old final is then simply replaced."""
    target = Path(target)
    if not target.exists():
        return None
    step = step_of(target)
    stem = stem or target.name.split(".")[0]
    if step is not None:
        kept = target.with_name(numbered_name(target.name, stem, step))
    else:  # a file without a step (imported, hand-made): the time it was last written
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(target.stat().st_mtime))
        base, dot, ext = target.name.partition(".")
        kept = target.with_name(f"{base}-{stamp}{dot}{ext}")
    if kept.exists():
        return None
    os.replace(target, kept)
    return kept
