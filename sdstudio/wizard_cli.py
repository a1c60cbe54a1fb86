"""`sdstudio quick PHOTOS --name N --class C [--memory 8] [--base REF]`: the Quick tab, headless.

Every check runs before anything heavy (a bad name, an empty class, too few photos, too little memory:
one line, exit 2). Then the stages print as they go, and the run ends with the LoRA in models/lora and a
sample grid in the run folder. `--more-steps N --run NAME` trains a finished run further.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .fields import finite_float


def register(sub: argparse._SubParsersAction) -> None:
    from .wizard import CLASSES

    p = sub.add_parser("quick", help="one command from photos to a tested character LoRA",
                       description="Check, crop and caption PHOTOS, pick the preset for your GPU memory, train a "
                                   "LoRA, draw a sample grid and put the LoRA in the workspace's models/lora.")
    p.add_argument("photos", nargs="*", type=Path, help="5-50 photos: image files, a folder or a zip")
    p.add_argument("--name", default="", help="the trigger word your LoRA learns, e.g. ohwx or mira")
    p.add_argument("--class", dest="class_word", default="", help=f"what the subject is: {', '.join(CLASSES)}")
    p.add_argument("--memory", type=finite_float, default=None, help="GPU memory in GB: 6, 8, 12 or 24, or 0 to train on the "
                                                              "CPU (default: detected, else 0 without a GPU)")
    p.add_argument("--base", default="", help="base model: tiny, a hub id, a diffusers folder or a .safetensors "
                                              "(default: the Library's choice, else tiny)")
    p.add_argument("--preset", default="", help="use this preset instead of the one picked for the memory")
    p.add_argument("--class-images", action="store_true", help="make class images and train with prior preservation")
    p.add_argument("--more-steps", type=int, default=0, metavar="N",
                   help="with --run: resume a finished Quick run and train N more steps")
    p.add_argument("--run", default="", help="the run to continue with --more-steps")
    adv = p.add_argument_group("overrides for quick tests (tiny model, a handful of steps)")
    adv.add_argument("--max-steps", type=int, default=0, help="training steps (default: from the photo count)")
    adv.add_argument("--resolution", type=int, default=0, help="training resolution (default: the preset's)")
    adv.add_argument("--sample-steps", type=int, default=0, help="denoising steps of previews and the grid")
    adv.add_argument("--captioner", default="auto", choices=["auto", "blip", "wd14", "none"], help="caption model")
    adv.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.set_defaults(func=run_quick_cmd)


def _memory_default() -> float:
    from .devices import gpu_summary

    try:
        total = gpu_summary().get("total_gb", 0)
    except Exception:
        total = 0
    return float(total) if total else 0.0  # no GPU: the CPU choice


def _printer(ev) -> None:
    from .events import Progress, Saved, Status, Step

    if isinstance(ev, Status) and ev.stage.startswith("quick."):
        parts = ev.stage.split(".")
        mark = {"done": "ok ", "skipped": "-- "}.get(parts[2] if len(parts) > 2 else "", ">> ")
        if parts[1] in ("warning", "note"):
            mark = "!! " if parts[1] == "warning" else "   "
        print(f"{mark}{ev.message}", file=sys.stderr, flush=True)
    elif isinstance(ev, Step) and (ev.step == ev.total or ev.step % max(1, ev.total // 20) == 0):
        print(f"   step {ev.step}/{ev.total} loss {ev.loss:.4f}", file=sys.stderr, flush=True)
    elif isinstance(ev, Progress) and ev.total and ev.done == ev.total:
        print(f"   {ev.stage}: {ev.done}/{ev.total}", file=sys.stderr, flush=True)
    elif isinstance(ev, Saved) and (ev.kind == "grid" or ev.published):
        print(f"   saved {ev.path}", file=sys.stderr, flush=True)


def run_quick_cmd(args) -> int:
    from .errors import UserError
    from .jobs import foreground_exit, run_foreground
    from .workspace import Workspace
    from .wizard import QuickConfig, more_steps_work, plan, quick_work

    ws = Workspace.open(None)
    if args.more_steps:
        if not args.run:
            raise UserError("--more-steps needs --run NAME: the Quick run to continue (see workspace/runs).")
        work = more_steps_work(ws, args.run, args.more_steps, grid_steps=args.sample_steps, device=args.device)
        job = run_foreground(args.run, "quick", work, listeners=[_printer])
    else:
        from .models.refs import Places

        base = Places.cli(ws).model(args.base or _library_base(ws)).ref  # the one model-reference rule
        qc = QuickConfig(photos=list(args.photos), name=args.name, class_word=args.class_word, base_model=base,
                         memory_gb=args.memory if args.memory is not None else _memory_default(),
                         regularization=args.class_images, preset=args.preset, max_steps=args.max_steps,
                         resolution=args.resolution, sample_steps=args.sample_steps, captioner=args.captioner,
                         device=args.device)
        p = plan(qc, ws)
        print(f"plan: {p.summary()}", file=sys.stderr)
        for w in p.warnings:
            print(f"!! {w}", file=sys.stderr)
        job = run_foreground(p.run_name, "quick", quick_work(p, ws), listeners=[_printer])
    code = foreground_exit(job, args.verbose, "stopped; the last checkpoint is kept")
    if code is not None:
        return code
    s = job.result or {}
    print(f"LoRA: {ws.root / s.get('lora', '')}")
    print(f"grid: {ws.root / s.get('grid', '')}")
    print(f"try:  {s.get('prompt', '')}")
    print("A1111: copy the LoRA into models/Lora; ComfyUI: into models/loras.")
    return 0


def _library_base(ws) -> str:
    import json

    try:
        return json.loads((ws.root / "settings" / "app.json").read_text(encoding="utf-8")).get("base_model", "tiny")
    except (OSError, ValueError):
        return "tiny"
