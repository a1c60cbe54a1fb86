"""The workspace: one folder that holds everything the app reads and writes, and the only place it may.

Every user-given path is resolved and confined here: `..`, absolute paths elsewhere, and symlinks that lead
out are refused with a clear message.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

SUBDIRS = (
    "datasets",
    "runs",
    "models/lora",
    "models/embeddings",
    "models/controlnet",
    "models/t2i_adapter",
    "models/checkpoints",
    "models/edlora",
    "models/gligen",
    "models/annotators",
    "models/rembg",
    "models/captioners",
    "outputs",
    "inputs",
    "settings",
)

CHANGES_FILE = ".changes"  # the change counter (see Workspace.note_change)

# Where each kind of model lives, so that tabs can list and save them consistently.
MODEL_DIRS = {
    "lora": "models/lora",
    "lycoris": "models/lora",
    "embedding": "models/embeddings",
    "controlnet": "models/controlnet",
    "t2i_adapter": "models/t2i_adapter",
    "checkpoint": "models/checkpoints",
    "edlora": "models/edlora",
    "gligen": "models/gligen",
}


def default_home() -> Path:
    return Path(os.environ.get("SDSTUDIO_HOME") or "workspace")


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def open(cls, root: Path | str | None = None) -> "Workspace":
        """Open (and create, with its standard subfolders) the workspace at `root`, or the default."""
        root = Path(root) if root is not None else default_home()
        try:
            root.mkdir(parents=True, exist_ok=True)
            for sub in SUBDIRS:
                (root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"Cannot create the workspace at {root}: {exc.strerror}; choose another folder "
                            f"with --home or $SDSTUDIO_HOME.") from exc
        return cls(root.resolve())

    def __truediv__(self, other: str) -> Path:
        return self.root / other

    def resolve(self, user_path: str | Path, must_exist: bool = False) -> Path:
        """Resolve a path the user gave (relative to the workspace, or absolute inside it) and refuse any
        path that ends up outside, whether through `..`, an absolute path or a symlink."""
        text = str(user_path).strip()
        if not text:
            raise UserError("The path is empty: choose a file or folder inside the workspace.")
        if "\x00" in text:
            raise UserError("The path contains a NUL character: choose a normal file name.")
        p = Path(text).expanduser()
        candidate = p if p.is_absolute() else self.root / p
        real = Path(os.path.realpath(candidate))  # follows every symlink on the way
        if real != self.root and self.root not in real.parents:
            raise UserError(f"{text} is outside the workspace ({self.root}): copy it into the workspace "
                            f"first, or start the app with --home pointing at a folder that contains it.")
        if must_exist and not real.exists():
            raise UserError(f"{text} does not exist in the workspace: check the name.")
        return real

    def relative(self, path: Path | str) -> str:
        """The path as the user should see it: relative to the workspace root when inside it."""
        p = Path(path)
        try:
            return p.resolve().relative_to(self.root).as_posix()
        except ValueError:
            return str(p)

    # -- the change counter: what tabs watch to refresh their lists ---------------------------------------
    def note_change(self) -> None:
        """Say that something the tabs list changed (a model published, imported or downloaded; a run
        written). Cheap and process-safe: it rewrites one small file, so a CLI run beside the app counts too."""
        from .formats.safe_io import atomic_write_text

        p = self.root / CHANGES_FILE
        try:
            n = int(p.read_text() or 0) + 1
        except (OSError, ValueError):
            n = 1
        try:
            atomic_write_text(p, str(n))
        except OSError:
            pass  # a full disk must not fail a finished run over a refresh hint

    def change_token(self) -> int:
        """A number that changes whenever `note_change` was called (by any process): one stat, no scan."""
        try:
            st = os.stat(self.root / CHANGES_FILE)
        except OSError:
            return 0
        return hash((st.st_mtime_ns, st.st_size, st.st_ino))

    def models(self, kind: str) -> Path:
        return self.root / MODEL_DIRS[kind]

    def run_dir(self, name: str) -> Path:
        return self.resolve(Path("runs") / safe_name(name))


def safe_name(name: str) -> str:
    """A file or folder name the user typed, made safe: no separators, no leading dots."""
    cleaned = "".join(c if (c.isalnum() or c in "-_. ") else "_" for c in name.strip()).strip(". ")
    if not cleaned:
        raise UserError(f"{name!r} is not a usable name: use letters, digits, '-' or '_'.")
    return cleaned[:120]
