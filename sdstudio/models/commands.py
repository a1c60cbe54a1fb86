"""`sdstudio tiny-model OUT [--family sd15|sdxl] [--size tiny|full] [--single-file F] [--gligen [MODULE]]`."""
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
        save_module(load_base(str(args.out)).unet, module,
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

    comps = load_base(str(folder))
    xl = comps.family.is_xl
    sd = pipeline_to_ldm(comps.unet, comps.vae, comps.text_encoders[0], comps.family.name,
                         text_encoder_2=comps.text_encoders[1] if xl else None)
    arch = "stable-diffusion-xl-v1-base" if xl else "stable-diffusion-v1"
    return save_safetensors(sd, out, metadata={"modelspec.architecture": arch,
                                               "sdstudio.model": "tiny-sdxl" if xl else "tiny"})
