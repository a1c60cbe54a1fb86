"""`sdstudio tiny-model OUT [--family sd15|sdxl] [--size tiny|full] [--single-file F] [--gligen [MODULE]]`,
`sdstudio download KEY|ORG/NAME`, `sdstudio import FILE`."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny-model", help="write a built-in tiny model (random weights) as a diffusers folder",
                       description="Write the built-in tiny SD-1.5- or SDXL-architecture model (random weights, "
                                   "offline), or with --size full the real architecture at full size for benchmarks.")
    p.add_argument("out", type=Path, help="folder to write (a diffusers model folder)")
    p.add_argument("--family", choices=("sd15", "sdxl"), default="sd15",
                   help="SD 1.5's layout (default) or SDXL's (two text encoders, text_time conditioning)")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny",
                   help="tiny (default; tests and the offline demo) or full: the real configs with random weights, "
                        "which only `sdstudio bench` and the gpu tests may load")
    p.add_argument("--single-file", type=Path, default=None,
                   help="also write an original-layout (A1111/LDM) single .safetensors checkpoint here (tiny only)")
    p.add_argument("--gligen", nargs="?", type=Path, const=True, default=None, metavar="MODULE",
                   help="write the tiny GLIGEN model (gated self-attention layers and a text-box position net), "
                        "and its GLIGEN part alone as a module file ComfyUI's GLIGEN loader reads (at MODULE, "
                        "default OUT/gligen.safetensors); SD 1.5 only")
    p.add_argument("--device", default="cpu", help="where a full-size model is built (cuda is much faster)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="weights' dtype on disk for --size full (fp16 halves the size)")
    p.set_defaults(func=run_tiny_model)

    p = sub.add_parser("download", help="download a model from the curated list or the hub into the workspace",
                       description="Download a base model, ControlNet, T2I-Adapter, annotator weights, captioner or "
                                   "background-removal model into the workspace's models/: only the files loading "
                                   "needs, resumable (run it again after a stop or a cut connection).")
    p.add_argument("source", nargs="?", default="", help="a catalog key (see --list) or a hub id org/name[@revision]")
    p.add_argument("--kind", default="auto", choices=["auto", "checkpoint", "controlnet", "t2i_adapter", "captioner"],
                   help="what a hub id is (default: told from its files)")
    p.add_argument("--fp16", action="store_true", help="the fp16 weights where the repo has them (half the size)")
    p.add_argument("--list", action="store_true", help="list the curated models and whether they are installed")
    p.set_defaults(func=run_download)

    p = sub.add_parser("import", help="import a model file (checkpoint, LoRA, embedding, ControlNet, VAE) into the "
                                      "workspace", description="Check a .safetensors model file, tell its kind and "
                                      "family from its tensors, and put it in the workspace's models/<kind>/ with "
                                      "its sha256 and A1111 short hash.")
    p.add_argument("file", help="the .safetensors file")
    p.add_argument("--link", action="store_true", help="hard-link instead of copying (same filesystem only)")
    p.set_defaults(func=run_import)


def run_tiny_model(args) -> int:
    from ..formats.safe_io import atomic_dir

    family = "sdxl" if args.family == "sdxl" else "sd1"
    gligen = args.gligen is not None
    if args.size == "full":
        if args.single_file or gligen:
            raise UserError("--single-file and --gligen are for the tiny models: a full-size random model is for "
                            "benchmarks only.")
        import torch

        from .full import write_full_model

        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        with atomic_dir(args.out) as tmp:
            write_full_model(tmp, args.family, device=args.device, dtype=dtype)
        print(f"wrote {args.out} (full-size {args.family}, random weights: for benchmarks only)")
        return 0
    if gligen and family == "sdxl":
        raise UserError("--gligen makes the SD 1.5 tiny GLIGEN model: leave out --family sdxl.")
    from .tiny import write_tiny_model

    with atomic_dir(args.out) as tmp:
        write_tiny_model(tmp, family, gligen=gligen)
    print(f"wrote {args.out}")
    if gligen:
        from ..formats.gligen import save_module
        from .loading import load_base

        module = args.out / "gligen.safetensors" if args.gligen is True else args.gligen
        save_module(load_base(str(Path(args.out).resolve())).unet, module,
                    metadata={"modelspec.architecture": "stable-diffusion-v1/gligen", "sdstudio.model": "tiny"})
        print(f"wrote {module}")
    if args.single_file:
        write_single_file(args.out, args.single_file)
        print(f"wrote {args.single_file}")
    return 0


def write_single_file(folder: Path, out: Path) -> Path:
    """A tiny model's diffusers folder as one original-layout checkpoint (SDXL: `conditioner.embedders.0/1`)."""
    from ..formats.ldm import pipeline_to_ldm
    from ..formats.safe_io import save_safetensors
    from .loading import load_base

    comps = load_base(str(Path(folder).resolve()))  # a relative text would mean the workspace first
    xl = comps.family.is_xl
    sd = pipeline_to_ldm(comps.unet, comps.vae, comps.text_encoders[0], comps.family.name,
                         text_encoder_2=comps.text_encoders[1] if xl else None)
    arch = "stable-diffusion-xl-v1-base" if xl else "stable-diffusion-v1"
    return save_safetensors(sd, out, metadata={"modelspec.architecture": arch,
                                               "sdstudio.model": "tiny-sdxl" if xl else "tiny"})


def run_download(args) -> int:
    import sys

    from ..errors import UserError
    from ..events import Progress, Status
    from ..jobs import foreground_exit, run_foreground
    from ..workspace import Workspace
    from .catalog import CATALOG, download_work, installed

    ws = Workspace.open()
    if args.list or not args.source:
        for e in CATALOG:
            mark = "installed" if installed(e, ws.root) else ""
            print(f"{e.key:<12} {e.kind:<12} {e.source:<60} {mark}")
        if not args.list:
            raise UserError("Name what to download: a key from the list above, or a hub id org/name.")
        return 0
    tty = sys.stderr.isatty()

    def show(ev) -> None:
        if isinstance(ev, Progress):
            if tty:
                print(f"\r\033[K{ev.message}", end="", file=sys.stderr, flush=True)
            elif ev.done == ev.total:
                print(ev.message, file=sys.stderr, flush=True)
        elif isinstance(ev, Status):
            print(("\n" if tty else "") + ev.message, file=sys.stderr, flush=True)

    job = run_foreground(args.source, "download", download_work(args.source, ws.root, kind=args.kind, half=args.fp16),
                         listeners=[show])
    if tty:
        print(file=sys.stderr)
    code = foreground_exit(job, args.verbose, "stopped; run the same command again to resume")
    if code is not None:
        return code
    print(job.result)
    return 0


def run_import(args) -> int:
    from ..jobs import foreground_exit, run_foreground
    from ..workspace import Workspace
    from .importer import import_work
    from .refs import Places

    ws = Workspace.open()
    src = Places.cli(ws).path(args.file, what="model file")
    job = run_foreground(src.name, "import", import_work(ws, src, link=args.link))
    code = foreground_exit(job, args.verbose)
    if code is not None:
        return code
    print(f"{ws.relative(job.result.path)}: {job.result.summary()}")
    return 0
