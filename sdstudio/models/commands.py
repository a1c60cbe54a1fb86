"""`sdstudio tiny-model OUT [--single-file F] [--gligen [MODULE]]`."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny-model", help="write the built-in tiny model (random weights) as a diffusers folder",
                       description="Write the built-in tiny SD-1.5-architecture model (random weights, offline).")
    p.add_argument("out", type=Path, help="folder to write (a diffusers model folder)")
    p.add_argument("--single-file", type=Path, default=None,
                   help="also write an original-layout (A1111/LDM) single .safetensors checkpoint here")
    p.add_argument("--gligen", nargs="?", type=Path, const=True, default=None, metavar="MODULE",
                   help="write the tiny GLIGEN model (gated self-attention layers and a text-box position net), "
                        "and its GLIGEN part alone as a module file ComfyUI's GLIGEN loader reads (at MODULE, "
                        "default OUT/gligen.safetensors)")
    p.set_defaults(func=run_tiny_model)


def run_tiny_model(args) -> int:
    from ..formats.ldm import pipeline_to_ldm
    from ..formats.safe_io import atomic_dir, save_safetensors
    from .tiny import write_tiny_model

    gligen = args.gligen is not None
    with atomic_dir(args.out) as tmp:
        write_tiny_model(tmp, gligen=gligen)
    print(f"wrote {args.out}")
    comps = None
    if gligen:
        from ..formats.gligen import save_module
        from .loading import load_base

        comps = load_base(str(args.out))
        module = args.out / "gligen.safetensors" if args.gligen is True else args.gligen
        save_module(comps.unet, module, metadata={"modelspec.architecture": "stable-diffusion-v1/gligen",
                                                  "sdstudio.model": "tiny"})
        print(f"wrote {module}")
    if args.single_file:
        from .loading import load_base

        comps = comps or load_base(str(args.out))
        save_safetensors(pipeline_to_ldm(comps.unet, comps.vae, comps.text_encoder), args.single_file,
                         metadata={"modelspec.architecture": "stable-diffusion-v1", "sdstudio.model": "tiny"})
        print(f"wrote {args.single_file}")
    return 0
