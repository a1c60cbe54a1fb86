"""`sdstudio train CONFIG.toml [--set k=v ...] [--resume]`: the same code the Train tab runs, headless.

Under `accelerate launch -m sdstudio train ...` (or torchrun) it trains on every process; only rank 0 prints
and writes files.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a LoRA, DreamBooth, full fine-tune, ... from a config or preset",
                       description="Train from a config TOML (or a preset name), with --set overrides.")
    p.add_argument("config", help="a config .toml, or a preset name from presets/ (e.g. character-lora-sd15)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set max_steps=500 --set lora.rank=8 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    from ..events import Preview, Progress, Saved, Status, Step
    from ..jobs import foreground_exit, run_foreground
    from ..errors import UserError
    from ..models.refs import Places
    from ..publish import publish
    from ..workspace import Workspace
    from .config import apply_places, list_presets, load_config
    from .loop import preflight, train

    from .machine import describe_changes, detect, fit_to_machine

    ws = Workspace.open()  # --home or $SDSTUDIO_HOME: the finished files are published into its models/
    places = Places.cli(ws)  # the one rule: the workspace first, then the current folder
    config = args.config
    if config not in list_presets():
        try:
            config = str(places.path(config, what="config"))
        except UserError:
            pass  # read_toml says it, listing the presets
    cfg = apply_places(load_config(config, args.sets), places)
    # The settings this machine cannot run as written (8-bit Adam without CUDA, ...), changed and said, as the
    # Train tab and the wizard do.
    machine = detect(cfg.device)
    cfg, changes = fit_to_machine(cfg, machine)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if changes and rank0:
        print(describe_changes(changes, machine), file=sys.stderr)
    if args.print_config:
        print(cfg.to_toml())
        return 0
    checked = preflight(cfg, resume=args.resume, home=ws.root)  # folder mistakes: one line, before any model loads
    bar = _Bar(enabled=rank0)

    def listener(ev) -> None:
        if isinstance(ev, Step):
            bar.step(ev)
        elif isinstance(ev, Progress):
            bar.line(ev.message if ev.stage == "download" else f"{ev.message or ev.stage} {ev.done}/{ev.total}")
        elif isinstance(ev, Status):
            bar.note(ev.message)
        elif isinstance(ev, Preview):
            bar.note(f"preview at step {ev.step}: {', '.join(ev.paths)}")
        elif isinstance(ev, Saved) and ev.published:
            bar.note(f"published {ev.path}")
        elif isinstance(ev, Saved) and ev.kind != "checkpoint":
            bar.note(f"saved {ev.path}")

    job = run_foreground(cfg.output_name, "train",
                         lambda ctx: train(cfg, ctx.emit, ctx.commands, resume=args.resume, checked=checked, home=ws.root,
                                           publish=lambda paths: publish(ws, paths) if rank0 else []),
                         listeners=[listener])
    bar.done()
    note = f"stopped; resume with: sdstudio train {args.config} --resume" if rank0 else None
    return foreground_exit(job, args.verbose, note) or 0


class _Bar:
    """One updating progress line on a terminal; plain lines when piped."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled, self.tty, self.open = enabled, sys.stderr.isatty(), False
        self.last_plain = 0.0

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r\033[K" + text)
            self.open = True
        elif time.time() - self.last_plain > 2:
            sys.stderr.write(text + "\n")
            self.last_plain = time.time()
        sys.stderr.flush()

    def step(self, ev) -> None:
        width = 24
        done = int(width * ev.step / max(ev.total, 1))
        eta = f"{ev.eta_s:.0f}s" if ev.eta_s is not None else "?"
        text = (f"[{'#' * done}{'.' * (width - done)}] {ev.step}/{ev.total} loss {ev.loss:.4f} lr {ev.lr:.2e} "
                f"{ev.it_per_s:.2f} it/s ETA {eta}")
        if not self.tty and ev.step == ev.total:
            self.last_plain = 0
        self.line(text)

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.open:
            sys.stderr.write("\n")
            self.open = False
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.open:
            sys.stderr.write("\n")
            self.open = False
