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
    "models/vae",
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
    "vae": "models/vae",
    "captioner": "models/captioners",
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
        _check_not_too_wide(root)
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

    def named_file(self, folder: str, name: str, suffix: str = "") -> Path:
        """`<workspace>/<folder>/<name><suffix>` for a name the user typed (a recipe, a preset, an upload): the
        name is made safe and the result confined, so no name can write elsewhere."""
        return self.resolve(Path(folder) / f"{safe_name(name)}{suffix}")


def safe_name(name: str) -> str:
    """A file or folder name the user typed, made safe: no separators, no control characters, no leading dots
    (so never `.` or `..`), at most 120 characters."""
    cleaned = "".join(c if (c.isalnum() or c in "-_. ") else "_" for c in str(name).strip()).strip(". ")
    if not cleaned:
        raise UserError(f"{name!r} is not a usable name: use letters, digits, '-' or '_'.")
    return cleaned[:120].rstrip(". ")


def check_name(name: str, what: str = "The name") -> str:
    """`name` itself when it is one plain file or folder name; otherwise a UserError that says why and offers
    the safe spelling. For names that end up in file names (a run's output_name): a name must never be a path."""
    text = str(name).strip()
    problem = None
    if not text:
        problem = "is empty"
    elif "/" in text or "\\" in text:
        problem = "contains a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in text):
        problem = "contains a control character"
    elif text.startswith("."):
        problem = "starts with a dot"
    elif len(text) > 120:
        problem = "is longer than 120 characters"
    if problem is None:
        return text
    try:
        hint = f": use {safe_name(text)!r} instead"
    except UserError:
        hint = ": use letters, digits, '-' or '_'"
    raise UserError(f"{what} {text[:60]!r} {problem}, so it cannot name a file{hint}.")


def _check_not_too_wide(root: Path) -> None:
    """The app serves and reads everything inside its workspace, so the workspace must be a folder of its own:
    never the filesystem root, the home folder, or a folder that holds the home folder."""
    real = Path(os.path.realpath(Path(root).expanduser()))
    home = Path(os.path.realpath(Path.home()))
    if real == Path(real.anchor) or real == home or real in home.parents:
        raise UserError(f"{root} cannot be the workspace: the app may read every file inside it. Choose a folder "
                        f"of its own, e.g. --home {home / 'sdstudio-workspace'}.")
