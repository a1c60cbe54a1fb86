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
    """The kohya folder name: `10_sks dog`."""
    return f"{int(repeats)}_{' '.join(x for x in (token.strip(), class_word.strip()) if x)}"


def parse_concept_dir(name: str) -> tuple[int, str, str] | None:
    """`10_sks dog` -> (10, "sks", "dog"); None when the name is not of the `N_words` form."""
    m = _CONCEPT_RE.match(name)
    if not m:
        return None
    words = m[2].strip().split(" ", 1)
    return int(m[1]), words[0], (words[1] if len(words) > 1 else "")


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                  and not p.name.startswith("."))


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
