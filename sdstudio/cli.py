"""`sdstudio` console script. Each command lives with its code; this file only wires them.

Errors a user can cause print one line and exit 2; there is no traceback for a user mistake.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import UserError

# Each module has `register(subparsers)`, which adds its commands with `set_defaults(func=...)`.
# Listed explicitly (no directory scans), in the order `--help` shows them.
COMMAND_MODULES = [
    "sdstudio.models.commands",  # tiny-model
    "sdstudio.data.commands",  # prepare, regularize
    "sdstudio.train.commands",  # train
    "sdstudio.methods.fusion_cli",  # fuse
    "sdstudio.formats.mixofshow_cli",  # mixofshow-import, mixofshow-export
    "sdstudio.playground.commands",  # generate
    "sdstudio.wizard_cli",  # quick
    "sdstudio.bench",  # bench
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdstudio", description="SD Studio: fine-tune and mix Stable Diffusion.")
    parser.add_argument("--home", default=None, help="workspace folder (default ./workspace or $SDSTUDIO_HOME)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.home:
        os.environ["SDSTUDIO_HOME"] = args.home
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _quiet_libraries(args.verbose)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130


def _quiet_libraries(verbose: bool) -> None:
    """Quiet logs and progress bars for a clean CLI. Importing diffusers/transformers here would cost seconds
    even on the instant-error path, so this only sets the environment; models/loading.py applies the rest
    (disable_progress_bar) when it imports them."""
    import logging
    import warnings

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ["SDSTUDIO_QUIET"] = "1"


if __name__ == "__main__":
    sys.exit(main())
