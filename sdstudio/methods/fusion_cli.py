"""`sdstudio fuse CONFIG.toml [--set k=v ...]`: Mix-of-Show gradient fusion of EDLoRA concepts, headless.

    base_model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    output_name = "anna-and-bob"
    [[concept]]
    path = "models/edlora/anna.safetensors"
    [[concept]]
    path = "models/edlora/bob.safetensors"
"""
from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fuse", help="fuse several EDLoRA concepts into one model (Mix-of-Show gradient fusion)",
                       description="Fuse the EDLoRA concepts listed as [[concept]] tables in CONFIG.toml.")
    p.add_argument("config", help="a fuse config .toml")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set unet_iters=100 (repeatable)")
    p.set_defaults(func=run)


def run(args) -> int:
    import os
    from pathlib import Path

    from ..events import Progress, Saved, Status
    from ..jobs import foreground_exit, run_foreground
    from .fusion import load_fuse_config, run_fuse

    from ..models.refs import Places

    home = Path(os.environ["SDSTUDIO_HOME"]) if os.environ.get("SDSTUDIO_HOME") else None
    config = Places(home.resolve() if home else None, Path.cwd()).path(args.config, what="fuse config")
    cfg = load_fuse_config(config, args.sets, home)

    def listener(ev) -> None:
        if isinstance(ev, Progress):
            print(f"[{ev.done}/{ev.total}] {ev.message}", file=sys.stderr, flush=True)
        elif isinstance(ev, Status):
            print(ev.message, file=sys.stderr, flush=True)
        elif isinstance(ev, Saved):
            print(f"saved {ev.path}", flush=True)

    job = run_foreground(cfg.output_name, "fuse", lambda ctx: run_fuse(cfg, ctx.emit, ctx.commands, home),
                         listeners=[listener])
    return foreground_exit(job, args.verbose) or 0
