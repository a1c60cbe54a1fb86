"""What `sdstudio bench train` and its --method variants share: each variant in its own process over interleaved
rounds (the best round counts), the table of ratios against the reference, the synthetic dataset and peak memory.
(bench.py dispatches to bench_controlnet.py, and both use these, so they live a floor below both.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_rounds(module: str, variants, ds: Path, tmp: Path, args) -> dict | None:
    """Run each variant of `module` (`python -m module VARIANT DS OUT STEPS RES BS BASE DEVICE`, printing a JSON
    line) in its own process, `args.repeats` interleaved rounds; the best round of each counts. None on a failure
    (its stderr is printed)."""
    results: dict = {}
    for round_ in range(args.repeats):
        for v in variants:
            cmd = [sys.executable, "-m", module, v, str(ds), str(tmp / f"{v}-{round_}"), str(args.steps),
                   str(args.resolution), str(args.batch_size), args.base, args.device]
            r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if r.returncode != 0:
                print(r.stderr[-2000:], file=sys.stderr)
                return None
            got = json.loads(r.stdout.strip().splitlines()[-1])
            best = results.get(v)
            if best is None or got["steps_per_s"] > best["steps_per_s"]:
                results[v] = dict(got, peak_mb=min(got["peak_mb"], best["peak_mb"]) if best else got["peak_mb"])
    return results


def print_table(title: str, variants, results: dict) -> None:
    """Steps/s and peak memory per variant, and their ratios to the first (the reference)."""
    ref = results[variants[0]]
    print(title)
    print(f"{'variant':<14}{'steps/s':>10}{'peak MB':>10}{'speed (ours/ref)':>18}{'memory (ours/ref)':>19}")
    for v in variants:
        r = results[v]
        print(f"{v:<14}{r['steps_per_s']:>10.2f}{r['peak_mb']:>10.0f}{r['steps_per_s'] / ref['steps_per_s']:>17.2f}x"
              f"{r['peak_mb'] / ref['peak_mb']:>18.2f}x")


def run_variant(argv: list[str], reference, ours) -> None:
    """A variant process's main: time `reference(...)` or `ours(..., cached=)` and print the JSON line."""
    variant, ds, out, steps, res, bs, base, device = argv
    steps, res, bs = int(steps), int(res), int(bs)
    Path(out).mkdir(parents=True, exist_ok=True)
    if variant == "reference":
        secs = reference(Path(ds), Path(out), steps, res, bs, base, device)
    else:
        secs = ours(Path(ds), Path(out), steps, res, bs, base, device, cached=variant == "ours-cached")
    print(json.dumps({"variant": variant, "seconds": secs, "steps_per_s": steps / secs, "peak_mb": _peak_mb(device)}))


def _make_dataset(folder: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.kron(rng.random((4, 4, 3)), np.ones((32, 32, 1)))
        Image.fromarray((img * 255).astype("uint8")).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a photo of sks dog, {i}")
    return folder


def _peak_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_our_loop(cfg, ds: Path, out: Path, base: str, device: str) -> float:
    """Seconds our loop takes to train `cfg` (its method) on the dataset `ds`, the base loaded from a fixed seed:
    the "ours" side of every bench train variant."""
    import time

    import torch

    from ..data.dataset import TrainDataset
    from ..data.folder import read_dataset
    from ..jobs import Commands
    from ..methods.base import RunInfo
    from ..methods.registry import get_method
    from ..models.loading import load_base
    from .loop import _make_accelerator, run_loop

    method = get_method(cfg.method)()
    layout = read_dataset(ds)
    data = TrainDataset(layout, cfg, conditioning=method.conditioning)
    acc, dtype = _make_accelerator(cfg, device)
    torch.manual_seed(0)
    c = load_base(base, device=device, dtype=dtype)
    method.run = RunInfo(cfg=cfg, run_dir=out, layout=layout)
    t0 = time.time()
    run_loop(method, c, data, cfg, lambda e: None, Commands(), acc=acc, run_dir=out)
    return time.time() - t0
