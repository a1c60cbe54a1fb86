"""`sdstudio bench NAME`: side-by-side benchmarks, reported as ratios against a reference in one run.

Each benchmark lives with the code it measures; its module has `register_bench(subparsers)` and is listed
here explicitly.
"""
from __future__ import annotations

import argparse
import importlib

BENCH_MODULES: list[str] = [
    "sdstudio.playground.bench",  # generate
    "sdstudio.train.bench",  # train
    "sdstudio.train.bench_vram",  # vram
    "sdstudio.train.bench_adapters",  # adapters
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: ours against a reference, as ratios",
                       description="Run a benchmark and print ours/reference ratios.")
    bsub = p.add_subparsers(dest="bench", metavar="NAME")
    for module in BENCH_MODULES:
        importlib.import_module(module).register_bench(bsub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
