"""`sdstudio prepare SRC --out DS ...` and `sdstudio regularize --model REF --class-word W --count N --out DIR`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError
from ..fields import finite_float


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="turn a folder/zip of images into a captioned kohya-style dataset",
                       description="Validate, crop, clean and caption images into DS/img/<repeats>_<trigger> "
                                   "<class>/ with .txt captions, metadata.jsonl and dataset.toml. Bad files are "
                                   "skipped and listed with their reason.")
    p.add_argument("src", nargs="+", type=Path, help="a folder, a .zip, or image files")
    p.add_argument("--out", type=Path, required=True, help="the dataset folder to write (img/ inside is replaced)")
    p.add_argument("--size", type=int, default=512, help="target side: 512 (SD1.5), 768 (SD2), 1024 (SDXL)")
    p.add_argument("--crop", default="centre", choices=["centre", "center", "face", "bucket", "none"],
                   help="centre square, square around the face, nearest aspect bucket, or no crop")
    p.add_argument("--caption", default="none", choices=["none", "blip", "wd14", "filename"],
                   help="how to caption images that have no .txt caption yet")
    p.add_argument("--caption-model", default="", help="hub id or folder of the BLIP/WD14 model (default: the "
                                                       "standard one; folders in models/captioners are found by name)")
    p.add_argument("--overwrite-captions", action="store_true", help="caption even images that have a .txt")
    p.add_argument("--trigger", default="", help="trigger word for the subject, e.g. sks")
    p.add_argument("--class-word", default="", help="what the subject is, e.g. dog, woman, style")
    p.add_argument("--repeats", type=int, default=10, help="kohya repeats per epoch (default 10)")
    p.add_argument("--remove-background", action="store_true", help="replace backgrounds with plain white (rembg)")
    p.add_argument("--background-model", default="u2net", help="rembg model name, file in models/rembg")
    p.add_argument("--background", default="255,255,255", help="R,G,B for removed backgrounds and alpha")
    p.add_argument("--min-side", type=int, default=64, help="skip images with a shorter side than this")
    p.add_argument("--skip-near-duplicates", action="store_true", help="drop near duplicates instead of warning")
    p.add_argument("--general-threshold", type=finite_float, default=0.35, help="WD14: general tag threshold")
    p.add_argument("--character-threshold", type=finite_float, default=0.85, help="WD14: character tag threshold")
    p.add_argument("--exclude-tags", default="", help="WD14: comma-separated tags never written")
    p.add_argument("--keep-underscores", action="store_true", help="WD14: keep long_hair instead of long hair")
    p.add_argument("--condition", default="", metavar="DETECTOR",
                   help="make a control image for each image (ControlNet/T2I-Adapter training) into DS/conditioning/: "
                        "canny, lineart_standard, shuffle or invert work offline; hed, softedge, mlsd, depth, normal, "
                        "openpose, lineart_realistic, lineart_anime need their files in models/annotators. Pairs in "
                        "the source (x.cond.png, conditioning/, metadata.jsonl) are used without it")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="folder with rembg/, captioners/ and annotators/ (default: the workspace's models/)")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu (for BLIP)")
    p.set_defaults(func=run_prepare)

    r = sub.add_parser("regularize", help="generate (or import) class images for prior preservation",
                       description="Write N class images ('photo of a <class>') with the base model. Resumable: "
                                   "images already in the folder are kept. If --out is a dataset folder, the "
                                   "images go to its reg/1_<class>/.")
    r.add_argument("--model", default="tiny", help="base model: tiny, a hub id, a diffusers folder or a .safetensors")
    r.add_argument("--class-word", required=True, help="the class, e.g. dog")
    r.add_argument("--count", type=int, default=100, help="how many class images in total")
    r.add_argument("--out", type=Path, required=True, help="folder for the images, or a dataset folder")
    r.add_argument("--prompt", default="", help="default: 'photo of a <class>'")
    r.add_argument("--negative", default="", help="negative prompt")
    r.add_argument("--steps", type=int, default=25, help="sampling steps")
    r.add_argument("--guidance", type=finite_float, default=7.0, help="CFG scale")
    r.add_argument("--size", type=int, default=0, help="image side (default: the model's resolution)")
    r.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    r.add_argument("--batch-size", type=int, default=1, help="images per pipeline call")
    r.add_argument("--import-from", type=Path, default=None, help="copy an existing class folder instead")
    r.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    r.set_defaults(func=run_regularize)


def _printer(ev) -> None:
    from ..events import Progress, Status

    if isinstance(ev, Progress) and ev.total:
        if sys.stderr.isatty():  # one line that updates in place on a terminal; a line per item in logs
            end = "\n" if ev.done >= ev.total else ""
            print(f"\r\033[K[{ev.stage}] {ev.done}/{ev.total} {ev.message[:60]}", end=end, file=sys.stderr,
                  flush=True)
        else:
            print(f"[{ev.stage}] {ev.done}/{ev.total} {ev.message}", file=sys.stderr, flush=True)
    elif isinstance(ev, Status):
        print(f"[{ev.stage}] {ev.message}", file=sys.stderr, flush=True)


def _models_dir(args) -> Path:
    from ..workspace import default_home

    return args.models_dir or default_home() / "models"


def _colour(text: str) -> tuple[int, int, int]:
    try:
        r, g, b = (int(x) for x in text.split(","))
        if all(0 <= v <= 255 for v in (r, g, b)):
            return r, g, b
    except ValueError:
        pass
    raise UserError(f"--background {text!r} is not a colour: use R,G,B with values 0-255, e.g. 255,255,255.")


def _finish(job, verbose: bool = False):
    from ..jobs import foreground_exit

    code = foreground_exit(job, verbose)
    if code is not None:
        raise SystemExit(code)
    return job.result


def run_prepare(args) -> int:
    from ..devices import pick_device
    from ..jobs import run_foreground
    from .caption import TaggerConfig
    from .prepare import PrepareConfig, prepare

    cfg = PrepareConfig(size=args.size, crop="centre" if args.crop == "center" else args.crop, caption=args.caption,
                        caption_model=args.caption_model, trigger=args.trigger, class_word=args.class_word,
                        repeats=args.repeats, remove_background=args.remove_background,
                        background_model=args.background_model, background=_colour(args.background),
                        min_side=args.min_side, skip_near_duplicates=args.skip_near_duplicates,
                        overwrite_captions=args.overwrite_captions, condition=args.condition,
                        tagger=TaggerConfig(general_threshold=args.general_threshold,
                                            character_threshold=args.character_threshold,
                                            exclude=[t for t in args.exclude_tags.split(",") if t.strip()],
                                            keep_underscores=args.keep_underscores))
    cfg.validate()
    for src in args.src:
        if not src.exists():
            raise UserError(f"{src} does not exist: give a folder, a .zip or image files.")
    out = args.out.resolve()
    for src in args.src:
        if src.is_dir() and (src.resolve() == out or src.resolve() in out.parents):
            raise UserError(f"--out {args.out} is the source folder or inside it: write the dataset elsewhere.")
    device = pick_device(args.device) if cfg.caption == "blip" else "cpu"
    job = run_foreground("prepare", "prepare",
                         lambda ctx: prepare(args.src, out, cfg, models_dir=_models_dir(args), emit=ctx.emit,
                                             check=ctx.commands.check, device=device), listeners=[_printer])
    report = _finish(job, args.verbose)
    print("\n".join(report.lines()))
    return 0


def run_regularize(args) -> int:
    from ..devices import pick_device
    from ..jobs import run_foreground
    from .regularization import RegularizationConfig, generate_class_images, import_class_folder, reg_dir

    out = args.out
    if (out / "img").is_dir() or (out / "dataset.toml").is_file():
        out = reg_dir(out, args.class_word)
    if args.import_from is not None:
        job = run_foreground("import class images", "regularize",
                             lambda ctx: import_class_folder(args.import_from, out, ctx.emit, ctx.commands.check),
                             listeners=[_printer])
        copied, skipped = _finish(job, args.verbose)
        for name, why in skipped:
            print(f"  skipped {name}: {why}")
        print(f"{len(copied)} class images in {out}")
        return 0 if copied else 2
    cfg = RegularizationConfig(class_word=args.class_word, count=args.count, prompt=args.prompt,
                               negative_prompt=args.negative, steps=args.steps, guidance=args.guidance,
                               size=args.size, seed=args.seed, batch_size=args.batch_size)
    if not cfg.class_word.strip():
        raise UserError("--class-word is empty: give the class, e.g. dog.")
    if cfg.count < 1:
        raise UserError("--count must be at least 1.")
    device = pick_device(args.device)

    def work(ctx):
        from ..devices import pick_dtype
        from ..models.loading import load_base

        existing = sum((out / f"class_{i:05d}.png").is_file() for i in range(cfg.count))
        if existing == cfg.count:
            return []
        comps = load_base(args.model, device=device, dtype=pick_dtype(device))
        return generate_class_images(comps, cfg, out, ctx.emit, ctx.commands.check)

    job = run_foreground("regularize", "regularize", work, listeners=[_printer])
    made = _finish(job, args.verbose)
    print(f"{len(made)} new class images, {cfg.count} in total in {out}")
    return 0
