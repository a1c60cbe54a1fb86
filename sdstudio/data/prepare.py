"""The dataset preparer: sources in (a folder, a zip, uploaded files), a kohya-style dataset out.

    1. collect   every file of the source (a zip is unpacked safely inside the output folder first)
    2. validate  each file: open, normalise to upright RGB, reasons to skip or warn; exact and near duplicates
    3. crop      centre / face / bucket / none, or a manual box per image
    4. clean     optional background removal (rembg)
    5. caption   existing .txt captions, or a captioner; trigger and class word first
    6. write     DS/img/<repeats>_<trigger> <class>/ (+ .txt), DS/metadata.jsonl, DS/dataset.toml, DS/report.json

Control images (ControlNet / T2I-Adapter datasets) come along in DS/conditioning/<repeats>_<trigger> <class>/,
cut exactly like their images: the user's own (`x.cond.png` beside `x.png`, a `conditioning/` folder mirroring
the source, or metadata.jsonl's conditioning_image column), else made by a detector (`condition = "canny"`).
Once a source brings pairs, an image without its control image, or with one of another size, is skipped and
reported, never silently dropped.

One bad file never stops the batch: it becomes a report line with its reason. Everything is written inside
the output folder, atomically (img/ is built in a temporary sibling and swapped in; reg/ is left alone).
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..events import Progress, Saved, Status
from ..formats.safe_io import atomic_dir, atomic_write_text
from .caption import TaggerConfig, make_captioner, split_tags, with_prefix
from .crop import CROP_MODES, Box, make_buckets, nearest_bucket, plan_crop
from .conditioning import CONDITIONING_DIR
from .folder import caption_path, concept_dir_name, list_images, parse_concept_dir, read_caption
from .images import IMAGE_EXTS, find_near_duplicates, inspect_image, safe_extract_zip, walk_files

CAPTION_EXTS = (".txt", ".caption")
KEPT, WARNING, SKIPPED = "kept", "warning", "skipped"


@dataclass
class PrepareConfig:
    size: int = 512  # target side in pixels (512 for SD 1.5, 768 for SD 2, 1024 for SDXL)
    crop: str = "centre"  # centre | face | bucket | none
    caption: str = "none"  # none | filename | blip | wd14
    caption_model: str = ""  # hub id or folder for blip/wd14 ("" = the default model)
    trigger: str = ""  # the rare token that will mean your subject, e.g. "sks"
    class_word: str = ""  # what the subject is: "dog", "woman", "style"
    repeats: int = 10  # kohya repeats: how often each image is seen per epoch
    remove_background: bool = False  # replace backgrounds with `background` (rembg)
    background_model: str = "u2net"  # rembg model name (file in models/rembg)
    background: tuple[int, int, int] = (255, 255, 255)  # colour for removed backgrounds and flattened alpha
    min_side: int = 64  # images with a shorter side are skipped as unusable
    near_duplicate_distance: int = 10  # dHash bits that make a candidate (a signature confirms it); lower = stricter
    skip_near_duplicates: bool = False  # drop near duplicates instead of flagging them
    overwrite_captions: bool = False  # run the captioner even where the source has a caption
    face_margin: float = 0.6  # face crop: space around the face, in face sizes
    manual_crops: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # source name -> box
    tagger: TaggerConfig = field(default_factory=TaggerConfig)
    caption_batch: int = 4  # images per captioner call
    condition: str = ""  # a detector that makes control images (data/detectors.py): canny, lineart_standard, ...

    def validate(self) -> None:
        if self.crop not in CROP_MODES:
            raise UserError(f"Unknown crop mode {self.crop!r}: use one of {', '.join(CROP_MODES)}.")
        if not 64 <= self.size <= 4096 or self.size % 8:
            raise UserError(f"Size {self.size} is not usable: pick 512, 768 or 1024 (a multiple of 8, 64-4096).")
        if self.repeats < 1:
            raise UserError("Repeats must be at least 1.")
        if not (self.trigger.strip() or self.class_word.strip()):
            raise UserError("Give a trigger word or a class word (or both): they name the dataset's folder.")
        if re.search(r"[/\\,]", self.trigger + self.class_word):
            raise UserError("Trigger and class words cannot contain '/', '\\' or ',': use plain words.")
        if self.condition and self.condition != "none":
            from .detectors import canonical

            canonical(self.condition)


@dataclass
class Item:
    """One source file's fate."""

    source: str  # path relative to the source, as the user knows it
    status: str = KEPT  # kept | warning | skipped
    reasons: list[str] = field(default_factory=list)
    output: str = ""  # path relative to the dataset folder
    size: tuple[int, int] = (0, 0)  # source size (upright)
    out_size: tuple[int, int] = (0, 0)
    caption: str = ""
    condition: str = ""  # its control image, relative to the dataset folder ("" when none)

    def warn(self, why: str) -> None:
        self.reasons.append(why)
        if self.status == KEPT:
            self.status = WARNING

    def skip(self, why: str) -> None:
        self.reasons.append(why)
        self.status = SKIPPED


@dataclass
class Report:
    dataset: Path
    items: list[Item]
    summary: dict
    config: dict

    @property
    def kept(self) -> list[Item]:
        return [i for i in self.items if i.status != SKIPPED]

    @property
    def skipped(self) -> list[Item]:
        return [i for i in self.items if i.status == SKIPPED]

    def lines(self) -> list[str]:
        s = self.summary
        pairs = sum(bool(i.condition) for i in self.kept)
        out = [f"{len(self.kept)} kept ({sum(i.status == WARNING for i in self.items)} with warnings), "
               f"{len(self.skipped)} skipped -> {self.dataset}" + (f"; {pairs} with a control image" if pairs else "")]
        out += [f"  skipped {i.source}: {'; '.join(i.reasons)}" for i in self.skipped]
        out += [f"  warning {i.source}: {'; '.join(i.reasons)}" for i in self.items if i.status == WARNING]
        if s.get("count"):
            out.append(f"  resolutions: {_top(s['resolutions'])}; buckets: {_top(s['buckets'])}")
            cl = s["caption_words"]
            out.append(f"  caption words: min {cl['min']}, mean {cl['mean']}, max {cl['max']}; "
                       f"top tags: {_top(s['tags'], 8)}")
        return out


def _top(counts: dict, n: int = 5) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in list(counts.items())[:n]) or "-"


# -- 1. collect ------------------------------------------------------------------------------------------------------
def collect(sources: Path | list[Path], staging: Path
            ) -> tuple[list[tuple[str, Path]], list[Item], dict[str, str], dict[str, Path]]:
    """(name, file) for every candidate image, items for files skipped while collecting, captions found beside
    the images ({name: caption}), and control images that come with them ({name: file}: `x.cond.png` beside
    `x.png`, a `conditioning/` folder mirroring the source, or metadata.jsonl's conditioning_image column)."""
    roots: list[tuple[Path, list[Path]]] = []
    skipped: list[Item] = []
    queue = [Path(s) for s in ([sources] if isinstance(sources, (str, Path)) else list(sources))]
    while queue:
        src = queue.pop(0)
        if src.is_dir():
            files = walk_files(src)
            queue += [f for f in files if f.suffix.lower() == ".zip"]  # a zip inside the folder is unpacked too
            roots.append((src, [f for f in files if f.suffix.lower() != ".zip"]))
        elif src.is_file() and src.suffix.lower() == ".zip":
            dest = staging / f"zip-{len(roots)}"
            try:
                files, bad = safe_extract_zip(src, dest)
            except UserError as exc:
                skipped.append(Item(source=src.name, status=SKIPPED, reasons=[str(exc)]))
                continue
            skipped += [Item(source=f"{src.name}:{name}", status=SKIPPED, reasons=[why]) for name, why in bad]
            roots.append((dest, files))
        elif src.is_file():
            roots.append((src.parent, [src]))
        else:
            raise UserError(f"{src} does not exist: choose a folder, a zip or image files.")
    candidates: list[tuple[str, Path]] = []
    captions: dict[str, str] = {}
    conditions: dict[str, Path] = {}
    for root, files in roots:
        by_stem = {f.with_suffix(""): f for f in files if f.suffix.lower() not in CAPTION_EXTS}
        cond_files = _source_conditions(root, files, by_stem, conditions)
        for f in files:
            name = f.relative_to(root).as_posix() if root in f.parents else f.name
            suffix = f.suffix.lower()
            if f in cond_files:
                continue  # a control image goes with its image (kept in `conditions`), it is not one to train on
            if suffix in CAPTION_EXTS and f.with_suffix("") in by_stem:
                img = by_stem[f.with_suffix("")]
                text = f.read_text(encoding="utf-8", errors="replace").strip()
                captions[img.relative_to(root).as_posix() if root in img.parents else img.name] = text
            elif f.name == "metadata.jsonl":
                for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
                    try:
                        row = json.loads(line)
                        rel = (f.parent / row["file_name"]).relative_to(root).as_posix()
                        captions.setdefault(rel, str(row.get("text") or row.get("caption") or ""))
                    except (ValueError, KeyError, TypeError):
                        continue
            elif suffix in IMAGE_EXTS or suffix == "" or _sniff_image(f):
                candidates.append((name, f))
            else:
                skipped.append(Item(source=name, status=SKIPPED, reasons=[f"not an image file ({suffix})"]))
    return candidates, skipped, captions, conditions


def _source_conditions(root: Path, files: list[Path], by_stem: dict, out: dict[str, Path]) -> set[Path]:
    """Find the control images among a source's files: fill `out` ({image name: control image}) and return
    the control files (which are then not candidates)."""
    from .conditioning import CONDITIONING_DIR, METADATA_COLUMNS
    from .folder import COND_TAG

    def rel(f: Path) -> str:
        return f.relative_to(root).as_posix() if root in f.parents else f.name

    found: set[Path] = set()
    images = {f.with_suffix(""): f for f in by_stem.values() if f.suffix.lower() in IMAGE_EXTS}
    for f in files:
        if f.suffix.lower() not in IMAGE_EXTS:
            continue
        parts = f.relative_to(root).parts if root in f.parents else (f.name,)
        if f.stem.endswith(COND_TAG):  # x.cond.png beside x.png
            img = images.get(f.with_name(f.stem[:-len(COND_TAG)]))
        elif len(parts) > 1 and parts[0] == CONDITIONING_DIR:  # conditioning/a/x.png for a/x.png
            img = images.get(root.joinpath(*parts[1:]).with_suffix(""))
        else:
            continue
        found.add(f)
        if img is not None:
            out[rel(img)] = f
    for meta in (f for f in files if f.name == "metadata.jsonl"):
        for line in meta.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
                col = next(row[c] for c in METADATA_COLUMNS if row.get(c))
                img, cond = meta.parent / row["file_name"], meta.parent / col
            except (ValueError, KeyError, TypeError, StopIteration):
                continue
            if cond.is_file():
                found.add(cond)
                out[rel(img)] = cond
    return found


def _sniff_image(path: Path) -> bool:
    """Images with an unexpected extension (photo.jpeg_large, scan.JFIF) are still tried."""
    try:
        head = path.open("rb").read(12)
    except OSError:
        return False
    return head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM")) or head[8:12] == b"WEBP"


# -- 2-6. the pipeline ---------------------------------------------------------------------------------------------
def prepare(sources: Path | list[Path], out: Path, cfg: PrepareConfig, *, models_dir: Path | None = None,
            emit: Callable = lambda ev: None, check: Callable = lambda: None, device: str = "cpu") -> Report:
    """Build the dataset at `out` from `sources`. Raises UserError when nothing usable remains.

    `models_dir` is the workspace's models/ folder (rembg/ and captioners/ inside it)."""
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / ".import"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        return _prepare(sources, out, staging, cfg, models_dir, emit, check, device)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _prepare(sources, out: Path, staging: Path, cfg: PrepareConfig, models_dir, emit, check, device) -> Report:
    emit(Status("collecting files", stage="collect"))
    candidates, items, captions, conditions = collect(sources, staging)
    concept = concept_dir_name(cfg.repeats, cfg.trigger, cfg.class_word)
    detector = cfg.condition if cfg.condition and cfg.condition != "none" else ""
    annotators = Path(models_dir) / "annotators" if models_dir else None
    if detector:
        from .detectors import canonical, missing_weights

        missing = missing_weights(detector, annotators)
        if missing:  # before any image is touched, not once per image
            raise UserError(f"The {canonical(detector)} detector needs {' and '.join(missing)} in models/annotators: "
                            f"download it from lllyasviel/Annotators and put it there, or use canny, "
                            f"lineart_standard or shuffle (no download).")
    pairs = Pairing(conditions, detector, annotators)
    remover = None
    if cfg.remove_background:
        from .background import BackgroundRemover

        if models_dir is None:
            raise UserError("Background removal needs the workspace's models folder: run it from the app or "
                            "the sdstudio command.")
        remover = BackgroundRemover(cfg.background_model, Path(models_dir) / "rembg")
    captioner = make_captioner(cfg.caption, model=cfg.caption_model, device=device, tagger=cfg.tagger,
                               search_dir=Path(models_dir) / "captioners" if models_dir else None)
    buckets = make_buckets(cfg.size)
    seen_sha: dict[str, str] = {}
    hashes: dict[str, int] = {}
    signatures: dict = {}
    kept: list[tuple[Item, Path]] = []
    with atomic_dir(out / "img") as img_root, atomic_dir(out / CONDITIONING_DIR) as cond_root:
        folder = img_root / concept
        folder.mkdir()
        pairs.folder = cond_root / concept
        used_names: set[str] = set()
        for n, (name, path) in enumerate(candidates, 1):
            check()  # Stop lands between images
            emit(Progress(n - 1, len(candidates), stage="prepare", message=name))
            item = Item(source=name)
            items.append(item)
            try:
                _one(item, path, cfg, seen_sha, hashes, signatures, remover, buckets, folder, used_names, captions, pairs)
            except UserError as exc:  # a model that fails on this one image: skip it, keep going
                item.skip(str(exc))
            except Exception as exc:  # a bug or a codec crash on one file must not end the batch
                item.skip(f"could not be processed ({type(exc).__name__}: {exc})")
            if item.status != SKIPPED:
                kept.append((item, folder / Path(item.output).name))
        emit(Progress(len(candidates), len(candidates), stage="prepare", message="validated"))
        for name, other in find_near_duplicates({i.source: hashes[i.source] for i, _ in kept},
                                                cfg.near_duplicate_distance, signatures).items():
            item = next(i for i, _ in kept if i.source == name)
            if cfg.skip_near_duplicates:
                item.skip(f"near-duplicate of {other}")
                (folder / Path(item.output).name).unlink()
                (pairs.folder / Path(item.output).name).unlink(missing_ok=True)
                item.output = item.condition = ""
            else:
                item.warn(f"near-duplicate of {other}")
        kept = [(i, p) for i, p in kept if i.status != SKIPPED]
        if not kept:
            reasons = Counter(r for i in items for r in i.reasons[:1])
            raise UserError(f"Nothing usable remains of {len(items)} files ("
                            f"{'; '.join(f'{v} {k}' for k, v in reasons.most_common(3)) or 'no files'}): "
                            f"add images that open (PNG, JPEG, WebP) and are at least {cfg.min_side} px.")
        _caption(kept, captioner, cfg, emit, check)
        for item, img in kept:
            atomic_write_text(caption_path(img), item.caption + "\n")
            item.output = f"img/{concept}/{img.name}"
            if item.condition:
                item.condition = f"{CONDITIONING_DIR}/{concept}/{img.name}"
    if not any(i.condition for i in items):  # no pairs: no empty conditioning/ folder
        shutil.rmtree(out / CONDITIONING_DIR, ignore_errors=True)
    emit(Status("writing metadata", stage="write"))
    summary = summarize(out)
    report = Report(dataset=out, items=items, summary=summary, config=_plain(cfg))
    write_records(out, report)
    emit(Saved(str(out), kind="dataset"))
    return report


def _check(item: Item, path: Path, cfg: PrepareConfig, seen_sha: dict, hashes: dict, signatures: dict | None = None):
    """Validate one file into `item`; returns the normalised image, or None when it is skipped."""
    info = inspect_image(path, cfg.background)
    if info.error:
        item.skip(info.error)
        return None
    item.size = info.size
    if min(info.size) < cfg.min_side:
        item.skip(f"{info.size[0]}x{info.size[1]} is too small to train on (under {cfg.min_side} px)")
        return None
    if info.sha256 in seen_sha:
        item.skip(f"exact duplicate of {seen_sha[info.sha256]}")
        return None
    seen_sha[info.sha256] = item.source
    hashes[item.source] = info.dhash
    if signatures is not None:
        signatures[item.source] = info.signature
    for note in info.notes:
        item.warn(note)
    if cfg.crop != "none" and min(info.size) < cfg.size:
        item.warn(f"small: {info.size[0]}x{info.size[1]} is under the {cfg.size} px target")
    return info


@dataclass
class Pairing:
    """Control images for one prepare: the source's own ({name: file}), else the detector's."""

    given: dict[str, Path]
    detector: str = ""
    annotators: Path | None = None
    folder: Path | None = None  # where they are written: DS/conditioning/<concept>/ (in the atomic temp folder)

    @property
    def wanted(self) -> bool:
        return bool(self.given or self.detector)

    def make(self, item: Item, source_size: tuple[int, int], plan, image):
        """This item's control image, cut like `image`; None (and the item skipped with why) when it cannot have
        one, or when this dataset has no control images at all."""
        from PIL import Image

        from .images import open_rgb

        src = self.given.get(item.source)
        if src is None and self.detector:
            from .detectors import preprocess

            return preprocess(image, self.detector, self.annotators)
        why = pair_problem(src, source_size)
        if why:
            item.skip(why)
            return None
        return plan.apply(open_rgb(src), Image.Resampling.BILINEAR)


def pair_problem(src: Path | None, image_size: tuple[int, int]) -> str:
    """What is wrong with an image's own control image ("" when nothing): missing, unreadable, another size."""
    from .conditioning import CONDITIONS

    if src is None:
        return "has no condition image (the other images have one: x.cond.png beside x.png, or conditioning/x.png)"
    return CONDITIONS["control"].check(src, image_size) or ""


def _one(item: Item, path: Path, cfg: PrepareConfig, seen_sha, hashes, signatures, remover, buckets, folder: Path,
         used_names: set[str], captions: dict[str, str], pairs: Pairing | None = None) -> None:
    info = _check(item, path, cfg, seen_sha, hashes, signatures)
    if info is None:
        return
    box = cfg.manual_crops.get(item.source)
    plan, notes = plan_crop(info.image, cfg.crop, cfg.size, box=Box(*box) if box else None, margin=cfg.face_margin,
                            buckets=buckets)
    image = plan.apply(info.image)
    for note in notes:
        (item.reasons.append if note.startswith("manual") else item.warn)(note)
    if remover is not None:
        image = remover.remove(image, cfg.background)
    cond = pairs.make(item, info.size, plan, image) if pairs is not None and pairs.wanted else None
    if item.status == SKIPPED:
        return
    item.out_size = image.size
    stem = _safe_stem(Path(item.source).with_suffix("").as_posix().replace("/", "_"))
    name, k = f"{stem}.png", 1
    while name.lower() in used_names:
        k += 1
        name = f"{stem}-{k}.png"
    used_names.add(name.lower())
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    (folder / name).write_bytes(buf.getvalue())  # inside the atomic temp folder: swapped in whole at the end
    item.output = name
    if cond is not None:
        pairs.folder.mkdir(parents=True, exist_ok=True)
        cond.save(pairs.folder / name, format="PNG")
        item.condition = name
    item.caption = captions.get(item.source, "")


def _safe_stem(stem: str) -> str:
    """Keep unicode letters; drop what file systems and kohya dislike."""
    import unicodedata

    stem = unicodedata.normalize("NFC", stem)  # macOS zips store names decomposed (NFD)
    cleaned = re.sub(r'[\x00-\x1f<>:"|?*\\]', "_", stem).strip(" .")
    return cleaned[:120] or "image"


def _caption(kept: list[tuple[Item, Path]], captioner, cfg: PrepareConfig, emit, check) -> None:
    from PIL import Image

    todo = [(i, p) for i, p in kept if captioner is not None and (cfg.overwrite_captions or not i.caption)]
    if todo:
        emit(Status(f"captioning {len(todo)} images with {captioner.name}", stage="caption"))
    for start in range(0, len(todo), max(1, cfg.caption_batch)):
        check()
        chunk = todo[start:start + max(1, cfg.caption_batch)]
        images = [Image.open(p).convert("RGB") for _, p in chunk]
        for (item, _), text in zip(chunk, captioner.caption(images, [Path(i.source) for i, _ in chunk])):
            item.caption = text
        emit(Progress(start + len(chunk), len(todo), stage="caption", message=chunk[-1][0].source))
    for item, _ in kept:
        item.caption = with_prefix(item.caption, cfg.trigger, cfg.class_word)


def _plain(cfg: PrepareConfig) -> dict:
    d = asdict(cfg)
    d["background"] = list(cfg.background)
    d["manual_crops"] = {k: list(v) for k, v in cfg.manual_crops.items()}
    return d


# -- records -------------------------------------------------------------------------------------------------------
def write_records(out: Path, report: Report) -> None:
    """metadata.jsonl (Hugging Face imagefolder), dataset.toml (what was done), report.json (per file)."""
    import tomli_w

    write_metadata_jsonl(out)
    doc = {
        "schema_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tool": "sdstudio prepare",
        "settings": {k: v for k, v in report.config.items() if v not in (None, {}, [])},
        "counts": {"kept": len(report.kept), "skipped": len(report.skipped),
                   "warnings": sum(i.status == WARNING for i in report.items)},
        "skipped": [{"file": i.source, "reason": "; ".join(i.reasons)} for i in report.skipped],
        "summary": {k: v for k, v in report.summary.items() if v not in (None, {}, [])},
    }
    atomic_write_text(out / "dataset.toml", tomli_w.dumps(_toml_safe(doc)))
    atomic_write_text(out / "report.json", json.dumps([asdict(i) for i in report.items], indent=1,
                                                      ensure_ascii=False))


def _toml_safe(v):
    if isinstance(v, dict):
        return {str(k): _toml_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_toml_safe(x) for x in v]
    return v


def write_metadata_jsonl(out: Path) -> Path:
    """One row per image: file_name and text (the Hugging Face imagefolder layout), plus conditioning_image when
    the image has a control image in DS/conditioning/ (diffusers' train_controlnet.py reads that column)."""
    rows = []
    for img in dataset_images(out):
        row = {"file_name": img.relative_to(out).as_posix(), "text": read_caption(img) or ""}
        cond = Path(out) / CONDITIONING_DIR / img.parent.name / img.name
        if cond.is_file():
            row["conditioning_image"] = cond.relative_to(out).as_posix()
        rows.append(json.dumps(row, ensure_ascii=False))
    return atomic_write_text(out / "metadata.jsonl", "\n".join(rows) + ("\n" if rows else ""))


def read_report(out: Path) -> list[Item]:
    try:
        rows = json.loads((Path(out) / "report.json").read_text(encoding="utf-8"))
        return [Item(**{**r, "size": tuple(r["size"]), "out_size": tuple(r["out_size"])}) for r in rows]
    except (OSError, ValueError, TypeError, KeyError):
        return []


def dataset_images(out: Path, part: str = "img") -> list[Path]:
    """The images of every concept folder under DS/img (or DS/reg)."""
    root = Path(out) / part
    if not root.is_dir():
        return []
    return [p for d in sorted(root.iterdir()) if d.is_dir() and parse_concept_dir(d.name) for p in list_images(d)]


def summarize(out: Path, base_size: int | None = None) -> dict:
    """Count, resolutions, buckets, caption lengths and tag frequency of the dataset at `out`."""
    from PIL import Image

    images = dataset_images(out)
    sizes: Counter = Counter()
    for p in images:
        try:
            with Image.open(p) as im:
                sizes[im.size] += 1
        except OSError:
            continue
    base = base_size or (max((max(s) for s in sizes), default=512) // 64 * 64 or 512)
    buckets = make_buckets(max(base, 64))
    bucket_counts: Counter = Counter()
    for (w, h), n in sizes.items():
        bw, bh = nearest_bucket(w, h, buckets)
        bucket_counts[f"{bw}x{bh}"] += n
    captions = [read_caption(p) or "" for p in images]
    words = [len(c.split()) for c in captions]
    tags = Counter(t for c in captions for t in split_tags(c))
    return {
        "count": len(images),
        "reg_count": len(dataset_images(out, "reg")),
        "resolutions": {f"{w}x{h}": n for (w, h), n in sizes.most_common()},
        "buckets": dict(bucket_counts.most_common()),
        "caption_words": {"min": min(words, default=0), "mean": round(sum(words) / len(words), 1) if words else 0,
                          "max": max(words, default=0), "uncaptioned": sum(not c for c in captions)},
        "tags": dict(tags.most_common(30)),
    }


# -- caption passes on a prepared dataset (the Dataset tab's "Caption" and tag edits) ------------------------------
def caption_dataset(out: Path, captioner, trigger: str = "", class_word: str = "", overwrite: bool = True,
                    emit: Callable = lambda ev: None, check: Callable = lambda: None, batch: int = 4) -> int:
    """Caption every image of DS/img (all, or only uncaptioned ones); returns how many were written."""
    from PIL import Image

    images = dataset_images(out)
    if not images:
        raise UserError(f"{out} has no prepared images: run Prepare first.")
    todo = [p for p in images if overwrite or not (read_caption(p) or "").strip()]
    emit(Status(f"captioning {len(todo)} images with {captioner.name}", stage="caption"))
    for start in range(0, len(todo), batch):
        check()
        chunk = todo[start:start + batch]
        pics = [Image.open(p).convert("RGB") for p in chunk]
        for p, text in zip(chunk, captioner.caption(pics, chunk)):
            atomic_write_text(caption_path(p), with_prefix(text, trigger, class_word) + "\n")
        emit(Progress(start + len(chunk), len(todo), stage="caption", message=chunk[-1].name))
    write_metadata_jsonl(out)
    return len(todo)


def edit_captions(out: Path, fn: Callable[[str], str]) -> int:
    """Apply `fn` to every caption of the dataset; returns how many changed."""
    changed = 0
    for p in dataset_images(out):
        old = read_caption(p) or ""
        new = fn(old)
        if new != old:
            atomic_write_text(caption_path(p), new + "\n")
            changed += 1
    if changed:
        write_metadata_jsonl(out)
    return changed


def save_caption(out: Path, image: Path, text: str) -> Path:
    """Save one caption typed in the editor (the image must be inside the dataset)."""
    out, image = Path(out).resolve(), Path(image).resolve()
    if out not in image.parents or not image.is_file():
        raise UserError(f"{image.name} is not an image of this dataset: reload the dataset.")
    path = atomic_write_text(caption_path(image), text.strip() + "\n")
    write_metadata_jsonl(out)
    return path


# -- a quick look before preparing (the Dataset tab's gallery) -----------------------------------------------------
def scan(sources: Path | list[Path], out: Path, cfg: PrepareConfig, emit: Callable = lambda ev: None,
         check: Callable = lambda: None, thumb_size: int = 256) -> list[dict]:
    """Validate every source file without writing the dataset: statuses, reasons and a thumbnail per file
    (in DS/.thumbs). Saved as DS/scan.json so that a page reload shows the same gallery."""
    from PIL import Image, ImageDraw

    out = Path(out)
    thumbs = out / ".thumbs"
    shutil.rmtree(thumbs, ignore_errors=True)
    thumbs.mkdir(parents=True)
    staging = out / ".scan"
    shutil.rmtree(staging, ignore_errors=True)
    candidates, items, _captions, conditions = collect(sources, staging)
    rows: list[dict] = [{**asdict(i), "path": "", "thumb": ""} for i in items]
    seen_sha: dict = {}
    hashes: dict = {}
    signatures: dict = {}
    for n, (name, path) in enumerate(candidates, 1):
        check()
        item = Item(source=name)
        try:
            info = _check(item, path, cfg, seen_sha, hashes, signatures)
        except Exception as exc:  # one odd file must not end the scan
            info = None
            item.skip(f"could not be processed ({type(exc).__name__})")
        if info is not None and conditions:  # the source brings pairs: check this one as prepare will
            src = conditions.get(name)
            why = pair_problem(src, info.size) if src is not None or not cfg.condition else ""
            if why:
                item.skip(why)
        thumb = thumbs / f"{n:05d}.jpg"
        if info is not None:
            im = info.image.copy()
            im.thumbnail((thumb_size, thumb_size))
        else:  # a grey card with a cross stands in for a file that cannot be shown
            im = Image.new("RGB", (thumb_size, thumb_size), (70, 70, 78))
            d = ImageDraw.Draw(im)
            d.line((40, 40, thumb_size - 40, thumb_size - 40), fill=(220, 90, 90), width=8)
            d.line((40, thumb_size - 40, thumb_size - 40, 40), fill=(220, 90, 90), width=8)
        im.save(thumb, quality=85)
        # Relative to the dataset folder: scan.json travels with a shared dataset without this machine's folders.
        rows.append({**asdict(item), "path": os.path.relpath(path, out), "thumb": os.path.relpath(thumb, out)})
        emit(Progress(n, len(candidates), stage="scan", message=name))
    dupes = find_near_duplicates({r["source"]: hashes[r["source"]] for r in rows if r["source"] in hashes},
                                 cfg.near_duplicate_distance, signatures)
    for r in rows:
        if r["source"] in dupes:
            r["reasons"].append(f"near-duplicate of {dupes[r['source']]}")
            r["status"] = SKIPPED if cfg.skip_near_duplicates else (WARNING if r["status"] == KEPT else r["status"])
    atomic_write_text(out / "scan.json", json.dumps(rows, indent=1, ensure_ascii=False))
    return rows


def read_scan(out: Path) -> list[dict]:
    """The last scan's rows, with statuses updated from the last prepare's report when there is one."""
    try:
        rows = json.loads((Path(out) / "scan.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    report = {i.source: i for i in read_report(out)}
    for r in rows:
        for key in ("path", "thumb"):  # stored relative to the dataset folder (older scans: absolute)
            if r.get(key) and not os.path.isabs(r[key]):
                r[key] = os.path.normpath(os.path.join(out, r[key]))
        done = report.get(r["source"])
        if done is not None:
            r.update(status=done.status, reasons=done.reasons, output=done.output)
    return rows
