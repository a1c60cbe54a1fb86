"""The dataset on disk: kohya-style `N_token class/` folders with `.txt` captions beside the images.

    DS/img/10_sks dog/0001.png + 0001.txt     (10 repeats, trigger "sks", class "dog")
    DS/reg/1_dog/0001.png                     (class images for prior preservation)
    DS/metadata.jsonl, DS/dataset.toml        (written by the preparer)

A plain folder of images (with .txt captions or a metadata.jsonl) also works: it is one concept, 1 repeat.
The dataset issue writes this layout; the training engine reads and validates it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .images import IMAGE_EXTS

_CONCEPT_RE = re.compile(r"^(\d+)_(.+)$")


@dataclass
class Concept:
    path: Path
    repeats: int
    token: str  # the trigger word(s), e.g. "sks"
    class_word: str  # e.g. "dog" ("" when the folder name has one word)
    images: list[Path] = field(default_factory=list)

    @property
    def prompt_prefix(self) -> str:
        return " ".join(x for x in (self.token, self.class_word) if x)


def concept_dir_name(repeats: int, token: str, class_word: str = "") -> str:
    """The kohya folder name: `10_sks dog`. The words become a folder name, so a word that is a path
    (`../x`, `a/b`) is refused rather than written somewhere else."""
    words = " ".join(x for x in (token.strip(), class_word.strip()) if x)
    if re.search(r"[/\\\x00-\x1f\x7f]", words):
        raise UserError(f"The trigger or class word {words[:60]!r} contains a slash or a control character: use "
                        f"plain words (e.g. 'sks dog').")
    return f"{int(repeats)}_{words}"


def parse_concept_dir(name: str) -> tuple[int, str, str] | None:
    """`10_sks dog` -> (10, "sks", "dog"); None when the name is not of the `N_words` form."""
    m = _CONCEPT_RE.match(name)
    if not m:
        return None
    words = m[2].strip().split(" ", 1)
    return int(m[1]), words[0], (words[1] if len(words) > 1 else "")


MASK_TAG = ".mask"  # `0001.mask.png` beside `0001.png`: white = learn here, black = ignore (masked loss)
COND_TAG = ".cond"  # `0001.cond.png` beside `0001.png`: its control image (data/conditioning.py)


def list_images(folder: Path) -> list[Path]:
    """The training images in `folder`: not hidden, not a mask or a control image that goes with another."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                  and not p.name.startswith(".") and not p.stem.endswith((MASK_TAG, COND_TAG)))


def mask_path(image: Path) -> Path | None:
    """The loss mask that goes with `image`, if the user put one beside it."""
    for suffix in (".png", ".jpg", ".webp"):
        p = image.with_name(image.stem + MASK_TAG + suffix)
        if p.is_file():
            return p
    return None


def caption_path(image: Path) -> Path:
    return image.with_suffix(".txt")


def read_caption(image: Path, metadata: dict[str, str] | None = None) -> str | None:
    """The caption for `image`: its .txt (or .caption) file, else metadata.jsonl's text, else None."""
    for suffix in (".txt", ".caption"):
        p = image.with_suffix(suffix)
        if p.is_file():
            return p.read_text(encoding="utf-8", errors="replace").strip()
    if metadata is not None:
        return metadata.get(image.name)
    return None


def metadata_images(folder: Path) -> list[Path]:
    """The images a folder's metadata.jsonl lists by `file_name`, in subfolders too (the Hugging Face
    imagefolder layout: images/0.png, conditioning_images/0.png, metadata.jsonl)."""
    p = folder / "metadata.jsonl"
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        name = row.get("file_name") if isinstance(row, dict) else None
        if isinstance(name, str) and name:
            img = (folder / name)
            if img.is_file() and img.suffix.lower() in IMAGE_EXTS and folder.resolve() in img.resolve().parents:
                out.append(img)
    return sorted(dict.fromkeys(out))


def read_metadata_jsonl(folder: Path) -> dict[str, str] | None:
    """Hugging Face imagefolder captions: {"file_name": ..., "text": ...} per line."""
    p = folder / "metadata.jsonl"
    if not p.is_file():
        return None
    out = {}
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            name = Path(row.get("file_name", "")).name
            text = row.get("text") or row.get("caption") or ""
            if name:
                out[name] = text
    return out


# ======================================================================================================
# Reading and validating a whole dataset before training (training-engine issue). Every mistake a user can
# make with folders is found here, in seconds, before any model loads.
# ======================================================================================================

@dataclass
class DatasetLayout:
    """A validated dataset: its concepts (with captions resolved) and, for prior preservation, class images."""

    root: Path
    kind: str  # "kohya" (N_token class/ folders) or "plain" (one folder of images)
    concepts: list[Concept]
    captions: dict[Path, str]  # every image -> its caption (a .txt, metadata.jsonl, the folder's words, or default)
    class_concepts: list[Concept] = field(default_factory=list)

    @property
    def images(self) -> list[Path]:
        return [p for c in self.concepts for p in c.images]

    @property
    def class_images(self) -> list[Path]:
        return [p for c in self.class_concepts for p in c.images]


def concept_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and parse_concept_dir(d.name) and not d.name.startswith("."))


def _looks_like_dataset(folder: Path) -> bool:
    try:
        return bool((folder / "img").is_dir() or concept_dirs(folder) or list_images(folder))
    except OSError:
        return False


def _names(paths: list[Path], n: int = 3) -> str:
    shown = ", ".join(p.name for p in paths[:n])
    return shown + (f" and {len(paths) - n} more" if len(paths) > n else "")


def _read_concepts(folder: Path, what: str) -> list[Concept]:
    out = []
    for d in concept_dirs(folder):
        repeats, token, class_word = parse_concept_dir(d.name)  # type: ignore[misc]
        if repeats < 1:
            raise UserError(f"{what} folder {d.name!r} has 0 repeats: rename it to start with 1_ or more.")
        imgs = list_images(d)
        if imgs:
            out.append(Concept(d, repeats, token, class_word, imgs))
    return out


def read_dataset(root: Path | str, *, default_caption: str = "", need_class: bool = False,
                 class_root: Path | str | None = None) -> DatasetLayout:
    """Find and check every image and caption of a dataset. Raises one UserError sentence that says what to
    do: wrong folder level, no images, missing captions (how many, which), class images missing."""
    root = Path(root).expanduser()
    if not str(root).strip() or str(root) == ".":
        raise UserError("No dataset chosen: pick a dataset folder (one made in the Dataset tab, or a folder of images).")
    if not root.exists():
        raise UserError(f"The dataset folder {root} does not exist: check the path.")
    if not root.is_dir():
        raise UserError(f"{root} is a file, not a folder: choose the folder that holds the images.")

    # 1. Which level did the user point at?
    if (root / "img").is_dir():  # DS/ (what the preparer writes)
        concepts, kind, img_root = _read_concepts(root / "img", "Concept"), "kohya", root / "img"
        if not concepts and list_images(root / "img"):
            concepts = [Concept(root / "img", 1, "", "", list_images(root / "img"))]
    elif concept_dirs(root):  # DS/img/ (what kohya's train_data_dir points at)
        concepts, kind, img_root = _read_concepts(root, "Concept"), "kohya", root
    elif list_images(root):
        parsed = parse_concept_dir(root.name)
        if parsed and root.parent.name == "img":
            raise UserError(f"{root} is one concept folder inside a dataset: choose the dataset folder "
                            f"{root.parent.parent} instead (it keeps the repeats and other concepts).")
        concepts, kind, img_root = [Concept(root, 1, "", "", list_images(root))], "plain", root
    elif metadata_images(root):  # images/ + metadata.jsonl naming them (Hugging Face imagefolder, fill50k)
        concepts, kind, img_root = [Concept(root, 1, "", "", metadata_images(root))], "plain", root
    else:
        subs = [d for d in sorted(root.iterdir()) if d.is_dir() and _looks_like_dataset(d)]
        if subs:
            raise UserError(f"{root} holds {len(subs)} dataset folder(s) ({_names(subs)}), not images: choose one "
                            f"of them.")
        raise UserError(f"{root} has no images ({', '.join(IMAGE_EXTS[:4])}...): add images, or choose the folder "
                        f"that holds them.")
    if not concepts:
        raise UserError(f"The concept folders in {img_root} hold no images: put the images inside the N_name "
                        f"folders.")

    # 2. Captions: .txt / .caption beside the image, metadata.jsonl, else the folder's words, else default.
    captions: dict[Path, str] = {}
    missing: list[Path] = []
    for c in concepts:
        meta = read_metadata_jsonl(c.path) or (read_metadata_jsonl(root) if c.path != root else None)
        found = {p: read_caption(p, meta) for p in c.images}
        have = [p for p, t in found.items() if t is not None]
        fallback = default_caption or c.prompt_prefix
        for p, text in found.items():
            if text is not None:
                captions[p] = text
            elif fallback and (not have or default_caption):
                captions[p] = fallback  # kohya's rule: an uncaptioned concept trains on its folder's words
            else:
                missing.append(p)
    if missing:
        raise UserError(f"{len(missing)} of {sum(len(c.images) for c in concepts)} images have no caption "
                        f"({_names(missing)}): add a .txt beside each, caption them in the Dataset tab, or set "
                        f"instance_prompt.")

    # 3. Class images for prior preservation.
    class_concepts: list[Concept] = []
    if need_class:
        croot = Path(class_root).expanduser() if class_root else (root / "reg" if (root / "reg").is_dir()
                                                                  else img_root.parent / "reg")
        if croot.is_dir():
            class_concepts = _read_concepts(croot, "Class") or (
                [Concept(croot, 1, "", "", list_images(croot))] if list_images(croot) else [])
        if not class_concepts:
            raise UserError(f"Prior preservation is on but {croot} has no class images: make them in the Dataset "
                            f"tab (Regularization), set class_data, or turn prior_preservation off.")
        for c in class_concepts:
            for p in c.images:
                text = read_caption(p) or c.prompt_prefix or default_caption
                if not text:
                    raise UserError(f"Class image {p.name} has no caption and its folder {c.path.name!r} names no "
                                    f"class: rename the folder like 1_dog.")
                captions[p] = text
    return DatasetLayout(root, kind, concepts, captions, class_concepts)
