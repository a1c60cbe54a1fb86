"""One rule for what a user types: a model reference, or a path. The CLI, the UI, recipes, presets and the
wizard all go through `Places`, so the same text means the same thing everywhere.

A model reference is, in this order:
  1. `tiny` (or `tiny-sdxl`), the built-in offline models;
  2. an existing file or folder: absolute, or relative to the workspace, then to the current folder;
  3. a known model by name: a checkpoint in the workspace's models/ (or a --models-from folder), named with or
     without its extension, or a hub model already downloaded there, named by its hub id;
  4. a hub id `org/name`, optionally `@revision`: downloaded into models/checkpoints/ on first use.
A reference that matches none of these is one sentence that lists what was tried.

A user path (a dataset, a recipe, an output folder, an item of a recipe) is relative to the workspace first,
then to the current folder; a path that does not exist yet is made in the workspace. The app (a browser may
be on another machine) confines every path to the workspace, and to the --models-from folders for reading.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .hub import HubId  # noqa: F401 (defined beside the downloader; parse_hub_id makes them)

TINY = "tiny"
TINY_SDXL = "tiny-sdxl"
TINY_REFS = {TINY: "sd1", TINY_SDXL: "sdxl"}  # the built-in tiny models: ref -> family
MODELS_FROM_ENV = "SDSTUDIO_MODELS_FROM"  # --models-from folders, os.pathsep-separated

# A hub id as the hub spells them: org/name, each part letters, digits, '-', '_' and '.', optionally @revision.
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<rev>[\w][\w./-]{0,199}))?$")

# Old ids that still work. Runway deleted its SD 1.5 repo in September 2024; the maintained copy is
# stable-diffusion-v1-5/stable-diffusion-v1-5, with the same files. tests/test_models_refs.py keeps this
# the only place that names the old id.
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".onnx")  # a file, never a hub repo

ALIASES = {
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}


def parse_hub_id(text: str) -> HubId | None:
    """`org/name` or `org/name@revision` as a HubId (aliases followed), else None."""
    m = HUB_ID.match(str(text).strip())
    if not m or ".." in m.group("repo") or m.group("repo").lower().endswith(MODEL_FILE_SUFFIXES):
        return None
    rev = m.group("rev")
    return HubId(ALIASES.get(m.group("repo"), m.group("repo")), None if rev in (None, "main") else rev)


def alias_note(text: str) -> str:
    """A note for a reference that used an old id, else ''."""
    m = HUB_ID.match(str(text).strip())
    if m and m.group("repo") in ALIASES:
        return (f"{m.group('repo')} no longer exists on the hub (deleted in 2024); using its maintained copy "
                f"{ALIASES[m.group('repo')]}, which has the same files.")
    return ""


@dataclass(frozen=True)
class ModelRef:
    """What a model reference resolved to: the tiny model, a local file or folder, or a hub id."""

    text: str  # what the user typed
    kind: str  # "tiny" | "path" | "hub"
    path: Path | None = None
    hub: HubId | None = None
    note: str = ""  # said once to the user (an alias followed)
    tried: tuple[str, ...] = field(default=(), compare=False)  # the local places looked at before the hub

    @property
    def ref(self) -> str:
        """What `load_base` and a run's config.toml take: 'tiny', an absolute path, or the hub id."""
        if self.kind == "tiny":
            return self.text
        return str(self.path) if self.path is not None else str(self.hub)


def models_from_roots() -> tuple[Path, ...]:
    """The read-only model folders of other apps (A1111, Forge, ComfyUI) given with --models-from."""
    text = os.environ.get(MODELS_FROM_ENV, "")
    return tuple(Path(p).expanduser().resolve() for p in text.split(os.pathsep) if p.strip())


def set_models_from(folders) -> tuple[Path, ...]:
    """Check the --models-from folders and make them this process's (and its children's) read-only roots."""
    roots = []
    for f in folders:
        p = Path(f).expanduser()
        if not p.is_dir():
            raise UserError(f"--models-from {f}: no such folder; point at an A1111, Forge or ComfyUI folder (or its "
                            f"models/ folder).")
        roots.append(str(p.resolve()))
    os.environ[MODELS_FROM_ENV] = os.pathsep.join(roots)
    return tuple(Path(r) for r in roots)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


@dataclass(frozen=True)
class Places:
    """Where user text is looked up. `workspace`: tried first, and where new paths go; `cwd`: tried second
    (the CLI; None in the app); `confine`: refuse anything outside the workspace (and, for reading, outside
    `read_only`), as the app must; `read_only`: the --models-from folders."""

    workspace: Path | None
    cwd: Path | None = None
    confine: bool = False
    read_only: tuple[Path, ...] = ()

    @classmethod
    def cli(cls, workspace=None) -> "Places":
        """The CLI's places: the workspace (--home, $SDSTUDIO_HOME or ./workspace), then the current folder.
        Looking things up never creates the workspace; a download into it makes the folders it needs."""
        from ..workspace import Workspace, default_home

        if isinstance(workspace, Workspace):
            root = workspace.root
        else:  # a folder (note that a Path's own .root is '/', so never getattr(..., "root"))
            root = Path(workspace if workspace is not None else default_home()).expanduser()
            root = Path(os.path.realpath(root))
        return cls(root, Path.cwd(), False, models_from_roots())

    @classmethod
    def app(cls, workspace) -> "Places":
        """The app's places: the workspace only, confined; --models-from folders readable."""
        return cls(Path(workspace.root), None, True, models_from_roots())

    # -- paths -----------------------------------------------------------------------------------------
    def _candidates(self, text: str) -> list[Path]:
        p = Path(text).expanduser()
        if p.is_absolute():
            return [p]
        return [root / p for root in (self.workspace, self.cwd) if root is not None]

    def _allowed(self, path: Path, text: str, *, write: bool = False) -> Path:
        real = Path(os.path.realpath(path))  # follows every symlink on the way
        if not self.confine:
            return real
        roots = [self.workspace] if write else [self.workspace, *self.read_only]
        if any(r is not None and _inside(real, Path(os.path.realpath(r))) for r in roots):
            return real
        extra = " or a --models-from folder" if self.read_only and not write else ""
        raise UserError(f"{text} is outside the workspace ({self.workspace}){extra}: copy it into the workspace "
                        f"first, or start the app with --home pointing at a folder that contains it.")

    def path(self, text, *, must_exist: bool = True, what: str = "file or folder") -> Path:
        """A user path by the one rule: the workspace first, then the current folder; a new path goes into the
        workspace. `must_exist`: a missing path is one sentence naming where it was looked for."""
        text = str(text).strip()
        if not text:
            raise UserError(f"The {what} is empty: choose one inside the workspace.")
        if "\x00" in text:
            raise UserError("The path contains a NUL character: choose a normal file name.")
        cands = self._candidates(text)
        for c in cands:
            if c.exists():
                return self._allowed(c, text)
        if must_exist:
            where = " or ".join(str(c) for c in cands)
            raise UserError(f"The {what} {text} does not exist (looked for {where}): check the name.")
        return self._allowed(cands[0], text, write=True)

    def output(self, text) -> Path:
        """A folder or file to write: an existing one by the rule, else a new one in the workspace. The app may
        write only inside the workspace."""
        path = self.path(text, must_exist=False, what="output")
        return self._allowed(path, str(text), write=True) if self.confine else path

    # -- model references ------------------------------------------------------------------------------
    def known_models(self, kind: str = "checkpoint") -> list[Path]:
        """Models of `kind` in the workspace's models/ folder and in the --models-from folders."""
        from .folders import list_model_paths

        return list_model_paths(self.workspace, kind, self.read_only)

    def model(self, text, kind: str = "checkpoint") -> ModelRef:
        """A model reference by the one rule (see the module docstring)."""
        t = str(text or "").strip()
        if not t:
            raise UserError("No base model chosen: pick one, or use 'tiny' for the offline demo model.")
        if t in TINY_REFS:
            return ModelRef(t, "tiny")
        tried: list[str] = []
        # 2. an existing file or folder
        for c in self._candidates(t) if "\x00" not in t else []:
            tried.append(str(c))
            if c.exists():
                return ModelRef(t, "path", path=self._allowed(c, t))
        # 3. a known model by name (a downloaded hub model by its id)
        hub = parse_hub_id(t)
        names = {t, t.casefold()} | ({hub.folder_name, hub.folder_name.casefold()} if hub else set())
        for p in self.known_models(kind):
            stem = p.name[: -len(p.suffix)] if p.is_file() and p.suffix else p.name
            if {p.name, stem, p.name.casefold(), stem.casefold()} & names:
                return ModelRef(t, "path", path=self._allowed(p, t), note=alias_note(t))
        where = "models/checkpoints" if kind == "checkpoint" else f"models/{kind}"
        tried.append(f"a model named {t!r} in {where}" + (" and the --models-from folders" if self.read_only else ""))
        # 4. a hub id
        if hub is not None:
            if self.workspace is None:
                raise UserError(f"{t} is a hub id, but there is no workspace to download it into: give --home.")
            return ModelRef(t, "hub", hub=hub, note=alias_note(t), tried=tuple(tried))
        tried.append("a hub id (it is not org/name)")
        if t.lower().endswith(MODEL_FILE_SUFFIXES) or t.count("/") > 1 or t.startswith(("/", ".", "~")):
            raise UserError(f"{t} does not exist: tried {'; '.join(tried)}. Check the path.")
        raise UserError(f"{t!r} is not a model: tried {'; '.join(tried)}. Use 'tiny', a hub id like "
                        f"stable-diffusion-v1-5/stable-diffusion-v1-5, a diffusers folder or a .safetensors file.")

    def download_dir(self, hub: HubId, kind: str = "checkpoint") -> Path:
        """Where a hub model of `kind` is downloaded to in the workspace."""
        from ..workspace import MODEL_DIRS

        return Path(self.workspace) / MODEL_DIRS[kind] / hub.folder_name

    def local_model(self, text_or_ref, *, half: bool = False, emit=None, check=None) -> str:
        """'tiny' or a local path for a model reference, downloading a hub id first (only the files loading
        needs; the fp16 variant when `half`), with progress through `emit` and Stop through `check`."""
        mref = text_or_ref if isinstance(text_or_ref, ModelRef) else self.model(text_or_ref)
        if mref.note and emit is not None:
            from ..events import Status

            emit(Status(mref.note, stage="note"))
        if mref.kind != "hub":
            return mref.ref
        from .hub import fetch_model

        return str(fetch_model(mref.hub, self.download_dir(mref.hub), kind="checkpoint", half=half, emit=emit,
                               check=check, tried=mref.tried))


RULES_HELP = """\
model references (base_model, --base, the pickers): 'tiny'; an existing file or folder (absolute, or relative
  to the workspace, then to the current folder); a model in the workspace's models/ by name; or a hub id
  org/name[@revision], downloaded into models/checkpoints/ on first use (only the files loading needs).
paths (datasets, recipes, outputs, recipe items): relative to the workspace first, then to the current folder;
  a new output goes into the workspace.
--models-from DIR adds an A1111, Forge or ComfyUI models folder to the pickers, read-only."""
