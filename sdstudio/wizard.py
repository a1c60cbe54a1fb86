"""The one-click character LoRA: photos in, a LoRA that has already been seen working out.

`plan(...)` checks everything a user can get wrong in well under a second (no model loads): the name, the
class, the photo count, the memory, the preset and its estimate. `quick_work(plan)` is the Job's work; it runs
the stages below through the preparer, the engine's loop and the Playground's grid code, and marks each stage
with a `Status(stage="quick.<id>[.done|.skipped]")`, so that the UI and the CLI draw the same stage list from
the events (`stage_states`).

    check       validate the photos (the preparer's scan: unreadable, too small, duplicates)
    crop        face-aware for people and characters, centre for dogs/objects, buckets for styles
    caption     BLIP for photos, WD14 for anime; trigger and class first (no model offline: trigger + class)
    regularize  optional class images from the base model (prior preservation)
    preset      the preset for family, class and memory, and its estimate
    train       the engine's loop (live loss, previews, checkpoints); the LoRA lands in models/lora
    grid        prompts (with and without the trigger) x LoRA weights 0.4-1.0, through the Playground
    playground  the run summary; the UI's "Open in Playground" hands the file over
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UserError
from .events import Finished, Preview, Progress, Saved, Status

CLASSES = ("person", "woman", "man", "dog", "anime character", "object", "style")
PEOPLE = ("person", "woman", "man", "anime character")
MEMORY_CHOICES = (6, 8, 12, 24)
CPU_MEMORY = 0  # the memory choice that means "no GPU: train on the CPU"
CPU_PRESET = "character-lora-sd15-8gb"
MIN_PHOTOS, MAX_PHOTOS, GOOD_PHOTOS = 5, 50, 10
MIN_SIDE = 256  # photos smaller than this are refused by the check stage for real models (tiny: 64)
GRID_WEIGHTS = (0.4, 0.6, 0.8, 1.0)
PRESET_FOR_MEMORY = ((6, "character-lora-sd15-6gb"), (8, "character-lora-sd15-8gb"), (12, "character-lora-sd15-12gb"))
# An SDXL base (and its fine-tunes) gets the SDXL ladder: 1024 px, its own memory advice.
PRESET_FOR_MEMORY_XL = ((8, "character-lora-sdxl-8gb"), (12, "character-lora-sdxl-12gb"),
                        (24, "character-lora-sdxl-24gb"))
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif")

STAGES = (
    ("check", "Check photos"),
    ("crop", "Crop"),
    ("caption", "Caption"),
    ("regularize", "Class images"),
    ("preset", "Pick preset"),
    ("train", "Train"),
    ("grid", "Sample grid"),
    ("playground", "Hand to Playground"),
)


@dataclass
class QuickConfig:
    """What the one button needs; everything else is chosen from these."""

    photos: list  # image files, folders or zips
    name: str  # the trigger word the LoRA learns, e.g. "ohwx" or "mira"
    class_word: str  # person, woman, man, dog, anime character, object, style
    base_model: str = "tiny"  # "tiny" | hub id | diffusers folder | .safetensors
    memory_gb: float = 8  # GPU memory the user has
    regularization: bool = False  # make class images and train with prior preservation
    reg_count: int = 0  # class images (0: 5 per photo, at most 200)
    preset: str = ""  # a preset name to use instead of the one picked for the memory
    # Overrides for tests and tinkerers (0/"" = the preset's or the wizard's choice):
    max_steps: int = 0
    resolution: int = 0
    sample_steps: int = 0  # denoising steps of previews, class images and the grid
    sample_every: int = -1  # -1: the preset's
    captioner: str = "auto"  # auto | blip | wd14 | none
    device: str = "auto"
    min_side: int = 0  # 0: 256 px, or 64 for the tiny model


@dataclass
class Plan:
    """What the wizard will do, decided before anything heavy runs."""

    config: QuickConfig
    run_name: str
    run_dir: Path
    dataset: Path
    photos: list[Path]
    preset: str
    values: dict  # the train config (preset + the wizard's choices), as plain data
    estimate: object
    crop: str
    captioner: str
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # choices made for the user, shown before starting

    captions: str = ""  # what the caption stage will really write (the captioner, or trigger + class offline)

    def summary(self) -> str:
        return (f"{len(self.photos)} photos -> {self.preset}: {self.estimate.summary()}. Crop: {self.crop}; "
                f"captions: {self.captions or self.captioner}.")


# -- 0. the sanity checks (synchronous, no model loads) --------------------------------------------------------
def _image_files(sources: list) -> list[Path]:
    out: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                          and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file() and p.suffix.lower() == ".zip":
            import zipfile

            try:
                with zipfile.ZipFile(p) as z:
                    out += [p / n for n in z.namelist() if Path(n).suffix.lower() in IMAGE_SUFFIXES]
            except zipfile.BadZipFile:
                raise UserError(f"{p.name} is not a readable zip: re-create it or drop the photos directly.") from None
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"{p} does not exist: choose your photos (files, a folder or a zip).")
    return out


def check_name(name: str) -> str:
    name = (name or "").strip()
    if not name:
        raise UserError("The name is empty: type the word that will call your LoRA, e.g. 'mira' or 'ohwx'.")
    if len(name.split()) > 1 or any(c in name for c in "/\\,:<>\"|?*"):
        raise UserError(f"The name {name!r} must be one word without punctuation: e.g. 'mira' or 'ohwx'.")
    if name.lower() in CLASSES:
        raise UserError(f"The name {name!r} is a class word: use a rare word of your own, e.g. 'ohwx' or 'mira'.")
    return name


def check_class(class_word: str) -> str:
    c = (class_word or "").strip().lower()
    if not c:
        raise UserError(f"The class is empty: choose what your subject is ({', '.join(CLASSES)}).")
    if any(ch in c for ch in "/\\,"):
        raise UserError(f"The class {class_word!r} must be plain words: e.g. {', '.join(CLASSES[:4])}.")
    return c


def pick_preset(memory_gb: float, xl: bool = False) -> str:
    """The character preset for a card of `memory_gb` (the SDXL ladder on an SDXL base); 0 means no GPU: the CPU
    trains the 8 GB preset (plain AdamW, no gradient checkpointing, which only slows a CPU down)."""
    ladder = PRESET_FOR_MEMORY_XL if xl else PRESET_FOR_MEMORY
    if memory_gb == CPU_MEMORY:
        return ladder[0][1] if xl else CPU_PRESET
    fits = [name for gb, name in ladder if gb <= memory_gb]
    if not fits:
        raise UserError(f"{memory_gb:g} GB of GPU memory is too little to train an {'SDXL' if xl else 'SD 1.5'} LoRA: "
                        f"the smallest preset ({ladder[0][1]}) is for a {ladder[0][0]} GB card.")
    return fits[-1]


def unique_run_name(ws, base: str) -> str:
    from .workspace import safe_name

    base = safe_name(base)
    name, k = base, 1
    while (ws.root / "runs" / name).exists() or (ws.root / "datasets" / name).exists():
        k += 1
        name = f"{base}-{k}"
    return name


def _photo_warnings(photos: list[Path], min_side: int) -> list[str]:
    """Too small, exact duplicates: a quick look (headers and bytes only)."""
    from PIL import Image

    small, seen, dupes = [], {}, []
    for p in photos:
        if not p.is_file():  # inside a zip: the check stage looks at it
            continue
        try:
            with Image.open(p) as im:
                if min(im.size) < min_side:
                    small.append(p.name)
        except Exception:
            continue  # the check stage explains unreadable files
        h = hashlib.sha256(p.read_bytes()).hexdigest()
        if h in seen:
            dupes.append(f"{p.name} = {seen[h]}")
        seen.setdefault(h, p.name)
    out = []
    if small:
        out.append(f"{len(small)} photo(s) are under {min_side} px and will be skipped: {', '.join(small[:5])}.")
    if dupes:
        out.append(f"{len(dupes)} exact duplicate(s) will be skipped: {', '.join(dupes[:5])}.")
    return out


def plan(qc: QuickConfig, ws, *, device_is_cuda: bool | None = None, machine=None) -> Plan:
    """Every check a user can fail, in one sentence each, before any training starts. Raises UserError.
    `machine` (train.machine.Machine) is this machine unless given; `device_is_cuda` is a shorthand for tests."""
    from .models.loading import TINY, TINY_REFS, family_of_ref
    from .train.config import PRESETS_DIR, load_config, read_toml
    from .train.estimate import check_fits, cpu_estimate, estimate
    from .train.machine import Machine, apply_changes, detect, fit_to_machine

    name = check_name(qc.name)
    cls = check_class(qc.class_word)
    if not qc.photos:
        raise UserError(f"No photos: drop {MIN_PHOTOS} to {MAX_PHOTOS} photos of your subject.")
    photos = _image_files(qc.photos)
    if len(photos) < MIN_PHOTOS:
        raise UserError(f"Only {len(photos)} photo(s): add at least {MIN_PHOTOS} ({GOOD_PHOTOS}-30 of different "
                        f"angles and light work best).")
    try:
        memory = float(qc.memory_gb)
    except (TypeError, ValueError):
        raise UserError(f"GPU memory {qc.memory_gb!r} is not a number: choose 6, 8, 12 or 24 GB.") from None
    base = (qc.base_model or TINY).strip()
    xl = family_of_ref(base).is_xl
    ladder = PRESET_FOR_MEMORY_XL if xl else PRESET_FOR_MEMORY
    if machine is None:
        if device_is_cuda is None:
            machine = detect(qc.device)
        else:
            from .train.machine import _has_bitsandbytes

            machine = Machine("cuda", bitsandbytes=_has_bitsandbytes()) if device_is_cuda else Machine("cpu")
    on_cpu = not machine.cuda
    picked = pick_preset(memory, xl)
    preset = (qc.preset or picked).strip()
    if not (PRESETS_DIR / f"{preset}.toml").is_file():
        raise UserError(f"There is no preset {preset!r}: use one of {', '.join(n for _, n in ladder)}.")
    run_name = unique_run_name(ws, f"{name}-{cls.replace(' ', '-')}")
    run_dir, dataset = ws.root / "runs" / run_name, ws.root / "datasets" / run_name
    gpu = _detected_gpu(memory)

    def resolved(name_: str):
        """The preset with the wizard's choices fitted to this machine, and the same at real size for the memory
        check (a test's tiny overrides must not hide a misfit)."""
        raw = read_toml(PRESETS_DIR / f"{name_}.toml")
        vals, nts = _train_values(qc, raw, name, cls, len(photos), base, run_name, run_dir, dataset)
        cfg = load_config(None, extra=vals)  # a bad override fails here, before anything runs
        _fitted, changes = fit_to_machine(cfg, machine)
        vals = apply_changes(vals, changes)
        nts = nts + [str(c) for c in changes]
        return vals, nts, load_config(None, extra={**vals, "resolution": raw.get("resolution", 512)})

    values, notes, real = resolved(preset)
    if on_cpu:
        # No GPU to fit: the time comes from a step measured here, on the config that will really run.
        est = cpu_estimate(load_config(None, extra=values))
    else:
        if not qc.preset and not estimate(real, gpu=gpu, device_is_cuda=True).fits(memory):
            # Class images double each step's images: step down the ladder to a preset that fits.
            for _gb, smaller in reversed([x for x in ladder if x[1] != preset and x[0] < memory]):
                v2, n2, r2 = resolved(smaller)
                if estimate(r2, gpu=gpu, device_is_cuda=True).fits(memory):
                    notes = n2 + [f"Class images double each step's images: using {smaller} to fit {memory:g} GB."]
                    preset, values, real = smaller, v2, r2
                    break
        alternatives = {n: resolved(n)[2] for _, n in ladder if n != preset}
        est = check_fits(real, memory, alternatives=alternatives, gpu=gpu, device_is_cuda=True)
    if qc.preset and qc.preset != picked:
        notes.append(f"Using {qc.preset} as asked (the wizard would pick {picked} for "
                     f"{'the CPU' if not memory else f'{memory:g} GB'}).")
    min_side = qc.min_side or (64 if base in TINY_REFS else MIN_SIDE)
    warnings = _photo_warnings(photos, min_side)
    if len(photos) < GOOD_PHOTOS:
        warnings.append(f"{len(photos)} photos is few: {GOOD_PHOTOS}-30 of different angles and light give a more "
                        f"flexible LoRA.")
    if len(photos) > MAX_PHOTOS:
        warnings.append(f"{len(photos)} photos is more than a character needs: {MAX_PHOTOS} varied ones are plenty "
                        f"(training takes longer).")
    crop = "face" if cls in PEOPLE else ("bucket" if cls == "style" else "centre")
    captioner = qc.captioner if qc.captioner != "auto" else ("wd14" if cls == "anime character" else "blip")
    return Plan(config=qc, run_name=run_name, run_dir=run_dir, dataset=dataset, photos=photos, preset=preset,
                values=values, estimate=est, crop=crop, captioner=captioner, warnings=warnings,
                notes=notes, captions=_captions_that_will_run(captioner, ws, name, cls))


def _captions_that_will_run(captioner: str, ws, name: str, cls: str) -> str:
    """What the caption stage will really do: the captioner, or trigger + class when its model is out of reach."""
    if captioner == "none":
        return f"'{name} {cls}' only (captioner off)"
    if not _reachable(captioner, ws.root / "models" / "captioners"):
        return f"'{name} {cls}' only (no {captioner.upper()} model here: put one in models/captioners/)"
    return captioner


_REACHABLE: dict = {}


def _reachable(kind: str, search: Path) -> bool:
    """captioner_reachable, remembered for a minute: the plan is redrawn on every form change, and a probe of
    the hub can take 2 s."""
    key = (kind, str(search))
    hit = _REACHABLE.get(key)
    if hit is None or time.time() - hit[1] > 60:
        hit = _REACHABLE[key] = (captioner_reachable(kind, search), time.time())
    return hit[0]


def _detected_gpu(memory: float):
    from .devices import gpu_summary
    from .train.estimate import gpu_class

    info = {}
    try:
        info = gpu_summary()
    except Exception:
        pass
    return gpu_class(info.get("name", ""), memory)


def steps_for(n_photos: int, batch_size: int) -> int:
    """~100 image views per photo (the kohya_ss rule of thumb for characters), 800-3000 views in all."""
    views = min(3000, max(800, 100 * n_photos))
    return max(1, round(views / batch_size / 50) * 50)


def _train_values(qc: QuickConfig, preset: dict, name: str, cls: str, n_photos: int, base: str, run_name: str,
                  run_dir: Path, dataset: Path) -> tuple[dict, list[str]]:
    notes = []
    v = dict(preset)
    prefix = f"{name} {cls}"
    v.update(base_model=base, dataset=str(dataset), output_name=run_name, output_dir=str(run_dir),
             instance_prompt=f"a photo of {prefix}",
             sample_prompts=sample_prompts(name, cls)[:2])
    v["max_steps"] = qc.max_steps or steps_for(n_photos, int(v.get("batch_size", 1)))
    v["warmup_steps"] = min(int(v.get("warmup_steps", 0)), v["max_steps"] // 10)
    if qc.resolution:
        v["resolution"] = qc.resolution
    if qc.sample_steps:
        v["sample_steps"] = qc.sample_steps
    if qc.sample_every >= 0:
        v["sample_every"] = qc.sample_every
    v["save_every"] = min(int(v.get("save_every", 250)), max(1, v["max_steps"] // 4))
    if cls == "anime character":  # WD14 tags: shuffling them (trigger kept first) generalises better
        v.update(shuffle_captions=True, keep_tokens=1)
    if qc.regularization:
        v["prior_preservation"] = True
    if qc.device != "auto":
        v["device"] = qc.device
    return v, notes


def sample_prompts(name: str, cls: str) -> list[str]:
    """Prompts for previews and the final grid: each with the trigger, then the same without it."""
    if cls == "style":
        pairs = [f"a mountain village at dusk, {name} style", f"a portrait of an old sailor, {name} style"]
        plain = ["a mountain village at dusk", "a portrait of an old sailor"]
    else:
        article = "an" if cls[:1] in "aeiou" else "a"
        pairs = [f"a photo of {name} {cls}", f"a portrait of {name} {cls} in a garden, detailed"]
        plain = [f"a photo of {article} {cls}", f"a portrait of {article} {cls} in a garden, detailed"]
    return pairs + plain


# -- the stages ------------------------------------------------------------------------------------------------
def _stage(emit, sid: str, message: str, state: str = "") -> None:
    emit(Status(message, stage=f"quick.{sid}" + (f".{state}" if state else "")))


def quick_work(p: Plan, ws, *, cache=None):
    """The Job's work function: runs every stage; returns the run summary (also saved as quick.json)."""
    def work(ctx):
        return run_quick(p, ws, ctx.emit, ctx.commands, cache=cache)
    return work


def run_quick(p: Plan, ws, emit, commands, *, cache=None) -> dict:
    from .data.prepare import PrepareConfig, prepare, scan
    from .devices import pick_device

    qc = p.config
    name, cls = check_name(qc.name), check_class(qc.class_word)
    check = commands.check
    device = pick_device(qc.device)
    from .models.refs import TINY_REFS

    min_side = qc.min_side or (64 if qc.base_model in ("", *TINY_REFS) else MIN_SIDE)
    size = int(p.values.get("resolution", 512))
    for w in p.warnings:
        emit(Status(f"warning: {w}", stage="quick.warning"))
    for n in p.notes:
        emit(Status(n, stage="quick.note"))

    # 1. check
    _stage(emit, "check", f"checking {len(p.photos)} photos")
    pcfg = PrepareConfig(size=size, crop=p.crop, caption="none", trigger=name, class_word=cls,
                         repeats=1, min_side=min_side)
    rows = scan(qc.photos, p.dataset, pcfg, emit=emit, check=check)
    usable = [r for r in rows if r["status"] != "skipped"]
    problems = [f"{r['source']}: {'; '.join(r['reasons'])}" for r in rows if r["reasons"]]
    for line in problems[:20]:
        emit(Status(f"warning: {line}", stage="quick.warning"))
    if len(usable) < MIN_PHOTOS:
        raise UserError(f"Only {len(usable)} of {len(rows)} photos are usable (the others are unreadable, too small "
                        f"or duplicates): add photos until at least {MIN_PHOTOS} are usable.")
    _stage(emit, "check", f"{len(usable)} of {len(rows)} photos usable, {len(problems)} with notes", "done")

    # 2. crop (+ the dataset folder in kohya layout); captions come next, so none here
    _stage(emit, "crop", {"face": "face-aware crops", "bucket": "aspect-ratio buckets",
                          "centre": "centre crops"}[p.crop] + f" at {size} px")
    report = prepare(qc.photos, p.dataset, pcfg, models_dir=ws.root / "models", emit=emit, check=check)
    _stage(emit, "crop", f"{len(report.kept)} images in {ws.relative(p.dataset)}", "done")

    # 3. caption
    _stage(emit, "caption", f"captioning with {p.captioner}")
    caption_note, captioned_by = _caption(p, ws, name, cls, device, emit, check)
    _stage(emit, "caption", caption_note, "done")

    # 4. class images
    if qc.regularization:
        _stage(emit, "regularize", f"making class images of '{cls}'")
        _regularize(p, ws, cls, emit, check, device, cache)
        _stage(emit, "regularize", "class images ready", "done")
    else:
        _stage(emit, "regularize", "off (turn on 'class images' for prior preservation)", "skipped")

    # 5. preset and estimate (decided in plan(); said here so the log has it)
    _stage(emit, "preset", f"{p.preset}: {p.estimate.summary()}")
    from .train.config import load_config

    cfg = load_config(None, extra=p.values)
    _stage(emit, "preset", f"{p.preset}, {cfg.max_steps} steps at {cfg.resolution} px", "done")
    # What the run is, before it trains: the hand-offs (Open in Dataset/Train tab) and "Train again" read it even
    # when the run is stopped before its end. `_finish` completes it.
    _write_summary(p.run_dir, {"run": p.run_name, "trigger": name, "class": cls, "preset": p.preset,
                               "estimate": p.estimate.summary(), "dataset": ws.relative(p.dataset),
                               "run_dir": ws.relative(p.run_dir), "captioner": captioned_by,
                               "photos": [ws.relative(x) for x in qc.photos], "steps": cfg.max_steps})

    # 6. train
    outputs = _train(cfg, ws, emit, commands, resume=False)
    lora = _published(ws, outputs)

    # 7. grid, 8. hand over
    return _finish(p.run_name, cfg, ws, lora, emit, check, grid_steps=qc.sample_steps or 25, name=name, cls=cls,
                   device=device, plan=p)


def _caption(p: Plan, ws, name, cls, device, emit, check) -> str:
    from .data.caption import make_captioner
    from .data.prepare import caption_dataset

    if p.captioner == "none":
        return f"captions are '{name} {cls}' only (captioner off)", "none"
    search = ws.root / "models" / "captioners"
    fallback = f"no {p.captioner.upper()} model offline: captions are '{name} {cls}' (trigger + class) only"
    ref = captioner_model(p.captioner)
    if not captioner_reachable(p.captioner, search):
        emit(Status(f"warning: no {p.captioner.upper()} model here and no internet: put {ref} in "
                    f"{ws.relative(search / ref.replace('/', '--'))} for richer captions", stage="quick.warning"))
        return fallback, "none"
    try:
        captioner = make_captioner(p.captioner, search_dir=search, device=device)
    except UserError as exc:
        emit(Status(f"warning: {exc}", stage="quick.warning"))
        return fallback, "none"
    n = caption_dataset(p.dataset, captioner, name, cls, emit=emit, check=check)
    return f"{n} captions by {p.captioner}, each starting with '{name} {cls}'", p.captioner


def captioner_model(kind: str) -> str:
    from .data.caption import DEFAULT_BLIP, DEFAULT_WD14

    return DEFAULT_WD14 if kind == "wd14" else DEFAULT_BLIP


def captioner_reachable(kind: str, search_dir: Path) -> bool:
    """True when the captioner's model is in the workspace, in the Hugging Face cache, or the hub answers
    within 2 s; offline, the wizard falls back at once (with a note saying where the model goes)."""
    from .data.caption import model_reachable

    return model_reachable(kind, captioner_model(kind), search_dir)


def _regularize(p: Plan, ws, cls, emit, check, device, cache) -> None:
    from .data.regularization import RegularizationConfig, generate_class_images, reg_dir
    from .devices import pick_dtype
    from .models.loading import load_base

    qc = p.config
    count = qc.reg_count or min(200, 5 * len(p.photos))
    rc = RegularizationConfig(class_word=cls, count=count, steps=qc.sample_steps or 25,
                              size=int(p.values.get("resolution", 512)))
    from .models.refs import Places

    dtype = pick_dtype(device)  # a hub id downloads into the workspace first, with progress
    base = Places.cli(ws).local_model(qc.base_model, half=str(dtype) in ("torch.float16", "torch.bfloat16"),
                                      emit=emit, check=check)
    comps = (cache.get(base, device=device, dtype=dtype) if cache is not None
             else load_base(base, device=device, dtype=dtype))
    generate_class_images(comps, rc, reg_dir(p.dataset, cls), emit=emit, check=check)


def _train(cfg, ws, emit, commands, *, resume: bool) -> list[Path]:
    from .train.loop import train

    _stage(emit, "train", f"training {cfg.max_steps} steps" + (" (resumed)" if resume else ""))

    from .publish import publish

    outputs = train(cfg, emit, commands, resume=resume, home=ws.root, publish=lambda paths: publish(ws, paths))
    _stage(emit, "train", f"finished {cfg.max_steps} steps", "done")
    return outputs


def _published(ws, outputs: list[Path]) -> Path:
    files = [Path(x) for x in outputs if Path(x).suffix == ".safetensors"]
    if not files:
        raise UserError("Training wrote no LoRA file: see the run's log, then train again.")
    target = ws.models("lora") / files[0].name
    return target if target.is_file() else files[0]


def _finish(run_name: str, cfg, ws, lora: Path, emit, check, *, grid_steps: int, name: str, cls: str, device: str,
            plan: Plan | None = None) -> dict:
    run_dir = Path(cfg.output_dir)
    _stage(emit, "grid", f"sample grid: {len(sample_prompts(name, cls))} prompts x weights "
                         f"{', '.join(map(str, GRID_WEIGHTS))}")
    grid = make_grid(ws, cfg, lora, name, cls, steps=grid_steps, device=device, emit=emit, check=check)
    emit(Preview(step=cfg.max_steps, paths=(str(grid),), captions=("final grid",)))
    emit(Saved(str(grid), kind="grid", step=cfg.max_steps))
    _stage(emit, "grid", f"grid saved: {ws.relative(grid)}", "done")

    _stage(emit, "playground", "handing the LoRA to the Playground")
    summary = {
        **_read_summary(run_dir),
        "run": run_name, "trigger": name, "class": cls, "lora": ws.relative(lora), "grid": ws.relative(grid),
        "run_dir": ws.relative(run_dir), "dataset": ws.relative(Path(cfg.dataset)), "steps": cfg.max_steps,
        "preset": plan.preset if plan else _read_summary(run_dir).get("preset", ""),
        "estimate": plan.estimate.summary() if plan else _read_summary(run_dir).get("estimate", ""),
        "files": [ws.relative(f) for f in run_files(run_dir)] + [ws.relative(lora)],
        "prompt": f"{sample_prompts(name, cls)[0]}, <lora:{lora.stem}:0.8>",
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_summary(run_dir, summary)
    _stage(emit, "playground", f"ready: {ws.relative(lora)}", "done")
    emit(Finished(message=f"{lora.name} is ready: try '{summary['prompt']}'", outputs=(str(lora), str(grid))))
    return summary


def _write_summary(run_dir: Path, summary: dict) -> None:
    from .formats.safe_io import atomic_write_text

    atomic_write_text(Path(run_dir) / "quick.json", json.dumps(summary, indent=1))


def _read_summary(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / "quick.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def run_files(run_dir: Path) -> list[Path]:
    """What a run wrote that a user cares about (not every checkpoint shard)."""
    run_dir = Path(run_dir)
    out = sorted(run_dir.glob("*.safetensors")) + [run_dir / "config.toml", run_dir / "log.jsonl"]
    out += sorted((run_dir / "checkpoints").glob("step-*"))[-1:]
    out += sorted((run_dir / "samples").glob("final-grid*.png"))
    return [p for p in out if p.exists()]


def make_grid(ws, cfg, lora: Path, name: str, cls: str, *, steps: int, device: str, emit=lambda ev: None,
              check=lambda: None) -> Path:
    """Prompts (with, then without the trigger) x LoRA weights, one labelled image, via the Playground."""
    from .devices import pick_dtype
    from .formats.safe_io import atomic_write_bytes
    from .playground.grid import Axis, compose, run_grid
    from .playground.outputs import png_bytes
    from .playground.recipe import LoraItem, Recipe
    from .playground.session import Playground

    from .models.refs import Places

    session = Playground(places=Places.cli(ws), lora_dir=ws.models("lora"), device=device, dtype=pick_dtype(device))
    prompts = sample_prompts(name, cls)
    # Workspace-relative paths: the recipe rides in the grid PNG, which must not carry this machine's folders.
    base = ws.relative(cfg.base_model) if Path(str(cfg.base_model)).is_absolute() else cfg.base_model
    recipe = Recipe(base_model=base, prompt=prompts[0], steps=steps, cfg=7.0, seed=cfg.sample_seed,
                    width=cfg.resolution, height=cfg.resolution, sampler="dpm++2m_karras",
                    lora=[LoraItem(path=ws.relative(lora), weight=1.0)])
    axis = Axis("lora_weight", list(GRID_WEIGHTS))
    rows, total = [], len(prompts) * len(GRID_WEIGHTS)

    for i, prompt in enumerate(prompts):
        def on_cell(done, _n, _img, i=i):
            emit(Progress(i * len(GRID_WEIGHTS) + done, total, stage="grid", message=prompt))

        _, images = run_grid(session, recipe.replace(prompt=prompt), axis, None, on_cell=on_cell, check=check)
        rows.append(images[0])
    image = compose(rows, [axis.label(v) for v in GRID_WEIGHTS], prompts, x_title=axis.title(recipe),
                    y_title="prompt")
    path = Path(cfg.output_dir) / "samples" / "final-grid.png"
    atomic_write_bytes(path, png_bytes(image, recipe))
    return path


# -- afterwards: train again with more steps --------------------------------------------------------------------
def more_steps_work(ws, run_name: str, extra_steps: int, *, grid_steps: int = 0, device: str = "auto"):
    """A Job work that raises max_steps by `extra_steps` and resumes the run from its last checkpoint, then
    draws a new grid. Checked (UserError) before the job starts by `check_more_steps`."""
    cfg, summary = check_more_steps(ws, run_name, extra_steps)

    def work(ctx):
        from .devices import pick_device

        emit = ctx.emit
        for sid, label in STAGES[:5]:
            _stage(emit, sid, "done in the first run", "done")
        outputs = _train(cfg, ws, emit, ctx.commands, resume=True)
        lora = _published(ws, outputs)
        return _finish(run_name, cfg, ws, lora, emit, ctx.commands.check,
                       grid_steps=grid_steps or cfg.sample_steps, name=summary["trigger"], cls=summary["class"],
                       device=pick_device(device))
    return work


def check_more_steps(ws, run_name: str, extra_steps: int):
    from .train.checkpoint import latest_checkpoint
    from .train.config import load_config

    from .workspace import check_name

    run_dir = ws.resolve(Path("runs") / check_name(run_name, "The run name"))  # a name, never a path
    summary = _read_summary(run_dir)
    if not summary or not (run_dir / "config.toml").is_file():
        raise UserError(f"{run_name!r} is not a finished Quick run: train one first.")
    if latest_checkpoint(run_dir) is None:
        raise UserError(f"{run_name!r} has no checkpoint to continue from: train it again from the start.")
    try:
        extra = int(extra_steps)
    except (TypeError, ValueError):
        raise UserError(f"{extra_steps!r} is not a number of steps: type e.g. 500.") from None
    if extra < 1:
        raise UserError("Add at least 1 step (500 is a good start).")
    cfg = load_config(run_dir / "config.toml")
    cfg.max_steps += extra
    return cfg, summary


# -- the stage list, from the events (UI and CLI) ---------------------------------------------------------------
def stage_states(events, end=None) -> list[dict]:
    """[{id, label, state: pending|running|done|skipped|failed|stopped, note}] from a job's events."""
    from .events import Failed

    rows = {sid: {"id": sid, "label": label, "state": "pending", "note": ""} for sid, label in STAGES}
    for ev in events:
        st = getattr(ev, "stage", "") or ""
        if not isinstance(ev, Status) or not st.startswith("quick."):
            continue
        parts = st.split(".")
        if len(parts) < 2 or parts[1] not in rows:
            continue
        row = rows[parts[1]]
        row["state"] = parts[2] if len(parts) > 2 else "running"
        row["note"] = ev.message
    if end is not None:
        for row in rows.values():
            if row["state"] == "running":
                row["state"] = "failed" if isinstance(end, Failed) else ("stopped" if end.stopped else "done")
                if isinstance(end, Failed):
                    row["note"] = end.message
    return list(rows.values())


def warnings_of(events) -> list[str]:
    return [ev.message.removeprefix("warning: ") for ev in events
            if isinstance(ev, Status) and ev.stage == "quick.warning"]


def plan_dict(p: Plan) -> dict:
    d = asdict(p.config)
    d["photos"] = [str(x) for x in p.photos]
    return {"run": p.run_name, "preset": p.preset, "estimate": p.estimate.summary(), "config": d}
