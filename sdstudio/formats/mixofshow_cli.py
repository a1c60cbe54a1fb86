"""`sdstudio mixofshow-import FILE.pth` and `sdstudio mixofshow-export FILE.safetensors --out F.pth`: move EDLoRA
concepts between SD Studio and Mix-of-Show (formats/mixofshow.py)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mixofshow-import", help="import a Mix-of-Show EDLoRA .pth into the workspace",
                       description="Convert a Mix-of-Show EDLoRA .pth (read with torch.load(weights_only=True), so "
                                   "it cannot run code) to an SD Studio EDLoRA .safetensors in models/edlora/.")
    p.add_argument("file", type=Path, help="the edlora_model-*.pth that Mix-of-Show's train_edlora.py wrote")
    p.add_argument("--out", type=Path, default=None, help="where to write (default: models/edlora/<name>.safetensors "
                                                          "in the workspace)")
    p.add_argument("--alpha", type=float, default=1.0, help="the LoRA strength Mix-of-Show would load it with "
                                                            "(default 1.0, as it trains)")
    p.add_argument("--base-model", default="", help="the base model it was trained on (noted in the file)")
    p.add_argument("--class-word", default="", help="what the concept is (noted in the file)")
    p.set_defaults(func=run_import)
    e = sub.add_parser("mixofshow-export", help="export an EDLoRA .safetensors as a Mix-of-Show .pth",
                       description="Write an SD Studio EDLoRA file as Mix-of-Show's {'params': ...} .pth, which its "
                                   "gradient_fusion.py and convert_edlora load.")
    e.add_argument("file", type=Path, help="an SD Studio EDLoRA .safetensors")
    e.add_argument("--out", type=Path, required=True, help="the .pth to write")
    e.add_argument("--alpha", type=float, default=1.0, help="the alpha you will load it with in Mix-of-Show "
                                                            "(default 1.0)")
    e.set_defaults(func=run_export)


def run_import(args) -> int:
    import os

    from ..errors import UserError
    from .mixofshow import import_mixofshow

    if args.file.suffix != ".pth":
        raise UserError(f"{args.file.name} is not a .pth: give the edlora_model-*.pth Mix-of-Show wrote.")
    if args.out is not None:
        out = import_mixofshow(args.file, args.out, args.alpha, args.base_model, args.class_word)
    else:
        from ..publish import publish
        from ..workspace import Workspace, default_home, safe_name

        ws = Workspace.open(os.environ.get("SDSTUDIO_HOME") or default_home())
        out = ws.models("edlora") / f"{safe_name(args.file.stem)}.safetensors"
        import_mixofshow(args.file, out, args.alpha, args.base_model, args.class_word)
        publish(ws, [out], kind="edlora")  # already in place: this notes the change for the open tabs
    print(f"wrote {out}")
    return 0


def run_export(args) -> int:
    from .mixofshow import export_mixofshow

    print(f"wrote {export_mixofshow(args.file, args.out, args.alpha)}")
    return 0
