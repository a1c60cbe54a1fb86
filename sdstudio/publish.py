"""One publisher: a finished artefact (file or folder) goes into the workspace's `models/<kind>/`, once.

The Train tab, the wizard and `sdstudio train` all publish through `publish`, and so will imports, downloads
and fusion. Each publication bumps the workspace's change counter (`Workspace.note_change`), which is what
the tabs watch to refresh their pickers, tables and galleries without a rescan per poll.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .formats.kinds import detect_kind
from .formats.numbered import keep_previous, same_content
from .formats.safe_io import atomic_copy, atomic_dir, remove_paths, stale_temporaries
from .workspace import MODEL_DIRS, Workspace


def publish(ws: Workspace, paths, *, kind: str | None = None, link: bool = False,
            names: dict | None = None) -> list[Path]:
    """Copy each artefact into `models/<kind>/` atomically (the kind read from the file unless given) and
    return where they went. Files of no model kind (a run card, a log) are skipped. `link`: hard-link files
    when the filesystem allows (an import of a file already in the workspace takes no second copy);
    `names`: {source path: file name to publish it as} (an import that would clash with another file). A different file
    already there is kept under its numbered name (its step), never overwritten."""
    out = []
    for p in map(Path, paths):
        k = kind or detect_kind(p)
        if k not in MODEL_DIRS or not p.exists():
            continue
        target = ws.models(k) / ((names or {}).get(p) or (names or {}).get(str(p)) or p.name)
        if target.resolve() == p.resolve():
            out.append(target)
            continue
        remove_paths(stale_temporaries(target.parent, target.name))  # an earlier publish of it was killed
        if target.exists():
            if same_content(target, p):
                out.append(target)
                continue
            keep_previous(target)  # "Train again": the earlier file stays, as name-000030.safetensors
        if p.is_dir():
            with atomic_dir(target) as tmp:
                shutil.copytree(p, tmp, dirs_exist_ok=True)
        else:
            atomic_copy(p, target, link=link)
        out.append(target)
    if out:
        ws.note_change()
    return out
