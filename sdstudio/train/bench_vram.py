"""`sdstudio bench vram`: each preset for a few steps on the full-size architecture at its own resolution and
batch (previews included, as a real run draws them), its measured peak beside the estimate the wizard uses.

On a CUDA GPU the measurements go to `presets/measured-vram.json` and the presets' `# Measured VRAM:` header
lines are generated from them (train/preset_headers.py). Elsewhere (a CPU smoke run) the table is written to
`--out` only. The peak a user sees in nvidia-smi is PyTorch's reserved peak plus the CUDA context; the estimate
(train/estimate.py) is meant to be above it.
"""
from __future__ import annotations

import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

from ..errors import UserError
from .bench_gpu import Runner, cpu_sets, make_dataset, model_for
from .measure import Spec, cuda_context_gb


def register_bench(sub) -> None:
    p = sub.add_parser("vram", help="measured peak GPU memory of each preset beside its estimate")
    p.add_argument("--device", default="cuda")
    p.add_argument("--arch", default="sd15,sdxl", help="which families' presets run (sd15, sdxl; tiny: CPU smoke)")
    p.add_argument("--presets", default="", help="comma-separated preset names (default: every preset of --arch)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per preset (the peak comes in the first)")
    p.add_argument("--models", type=Path, default=None, help="folder of full-size models (made there when missing)")
    p.add_argument("--out", type=Path, default=None,
                   help="write the measurements here (default on CUDA: presets/measured-vram.json)")
    p.add_argument("--no-headers", action="store_true", help="do not regenerate the presets' header lines")
    p.add_argument("--budget-s", type=float, default=0, help="start no run after this many seconds (0: no limit)")
    p.add_argument("--jobs", type=int, default=1,
                   help="presets measured at once (each in its own process, so each peak is still its own; the CUDA "
                        "context is then read once, alone)")
    p.add_argument("--apply", type=Path, default=None,
                   help="measure nothing: take this measurements file (from a GPU run) as presets/measured-vram.json "
                        "and regenerate the presets' header lines")
    p.set_defaults(func=run_vram)


def preset_arch(name: str) -> str:
    """The family a preset is for, from its name (presets end in -sd15 / -sdxl, before any -<N>gb)."""
    return "sdxl" if "sdxl" in name else "sd15"


def presets_for(archs: list[str], names: str = "") -> list[str]:
    from .config import list_presets

    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in list_presets()]
        if unknown:
            raise UserError(f"No preset named {unknown[0]}: choose from {', '.join(list_presets())}.")
        return wanted
    fams = {"sd15" if a == "tiny" else a for a in archs}
    return [n for n in list_presets() if preset_arch(n) in fams]


def make_kohya_dataset(root: Path, size: int) -> Path:
    """img/ with 8 captioned images and reg/ with 4 class images: every preset finds what it needs."""
    make_dataset(root / "img" / "1_sks person", 8, size)
    make_dataset(root / "reg" / "1_person", 4, size)
    for t in (root / "reg" / "1_person").glob("*.txt"):
        t.unlink()
    return root


def run_vram(args) -> int:
    from .config import load_config

    if args.apply is not None:
        return apply_measurements(args.apply)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    cuda = str(args.device).startswith("cuda")
    names = presets_for(archs, args.presets)
    runner = Runner(args.budget_s)
    context = cuda_context_gb() if cuda and args.jobs > 1 else None
    jobs = []
    with tempfile.TemporaryDirectory(prefix="sdstudio-vram-") as tmp:
        datasets: dict[int, Path] = {}
        for name in names:
            arch = "tiny" if "tiny" in archs else preset_arch(name)
            if arch not in archs:
                continue
            base = model_for(arch, args.models, args.device)
            real = load_config(name)  # the preset as a user runs it: what the estimate is about
            # The tiny smoke run keeps the preset but at 64 px (the tiny model's size).
            res = 64 if arch == "tiny" else real.resolution
            if res not in datasets:
                datasets[res] = make_kohya_dataset(Path(tmp) / f"ds-{res}", res)
            sets = cpu_sets(name, args.device) + ([f"resolution={res}"] if arch == "tiny" else [])
            spec = Spec(variant="ours", base=base, dataset=str(datasets[res]), out=str(Path(tmp) / name), preset=name,
                        sets=sets, warmup=0, steps=args.steps, device=args.device, previews=True)
            jobs.append((name, arch, real, spec))
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # each job is a child process
            results = list(pool.map(lambda job: runner(job[3]), jobs))
    rows = [_row(name, arch, real, got, context, args.steps) for (name, arch, real, _), got in zip(jobs, results)]
    print(format_table(rows))
    out = args.out
    if out is None and cuda:
        from .preset_headers import MEASUREMENTS

        out = MEASUREMENTS
    if out is not None:
        _write(out, rows, merge=out.is_file())
        print(f"wrote {out}")
        if cuda and not args.no_headers:
            from .preset_headers import read_measurements, sync_headers

            changed = sync_headers(read_measurements(out))
            print(f"preset headers regenerated: {', '.join(changed) or 'none changed'}")
    return 0


def _row(name: str, arch: str, real, got: dict, context: float | None, steps: int) -> dict:
    import torch

    from ..models.loading import family_of_ref
    from .estimate import estimate

    est = estimate(real, device_is_cuda=True)
    row = {"preset": name, "arch": arch, "resolution": real.resolution, "batch": real.batch_size,
           "estimate_gb": est.vram_gb, "family": family_of_ref(real.base_model).name}
    if "error" in got:
        return dict(row, error=got["error"])
    context = got["context_gb"] if context is None else context
    total = got["peak_reserved_gb"] + context
    return dict(row, peak_allocated_gb=got["peak_allocated_gb"], peak_reserved_gb=got["peak_reserved_gb"],
                context_gb=context, total_gb=total, device_name=got["device_name"], torch=torch.__version__,
                date=date.today().isoformat(), steps=steps, resolution=got["resolution"],
                within_estimate=total <= est.vram_gb)


def apply_measurements(path: Path) -> int:
    """A measurements file from a GPU run becomes presets/measured-vram.json, and the headers follow it."""
    from ..formats.safe_io import atomic_write_text
    from .preset_headers import MEASUREMENTS, read_measurements, sync_headers

    if not Path(path).is_file():
        raise UserError(f"{path} does not exist: give the measured-vram.json a GPU run of `sdstudio bench vram` wrote.")
    if Path(path).resolve() != MEASUREMENTS.resolve():
        atomic_write_text(MEASUREMENTS, Path(path).read_text(encoding="utf-8"))
    changed = sync_headers(read_measurements(MEASUREMENTS))
    print(f"preset headers regenerated from {MEASUREMENTS}: {', '.join(changed) or 'none changed'}")
    return 0


def _write(path: Path, rows: list[dict], merge: bool) -> None:
    """Merge this run's good measurements into the file (presets measured before keep their figures)."""
    from ..formats.safe_io import atomic_write_text

    data = json.loads(Path(path).read_text(encoding="utf-8")) if merge else {}
    presets = data.get("presets", {})
    presets.update({r["preset"]: r for r in rows if "error" not in r})
    data = {"about": "written by `sdstudio bench vram`; the presets' '# Measured VRAM:' lines are generated from it",
            "updated": time.strftime("%Y-%m-%d %H:%M:%S"), "presets": dict(sorted(presets.items())),
            "last_run": rows}
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def format_table(rows: list[dict]) -> str:
    lines = [f"{'preset':<30}{'px':>6}{'batch':>6}{'estimate':>10}{'measured':>10}{'reserved':>10}{'alloc':>8}"
             f"{'context':>9}  within estimate"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['preset']:<30}{r['resolution']:>6}{r['batch']:>6}{r['estimate_gb']:>9.1f}G  {r['error']}")
            continue
        lines.append(f"{r['preset']:<30}{r['resolution']:>6}{r['batch']:>6}{r['estimate_gb']:>9.1f}G"
                     f"{r['total_gb']:>9.2f}G{r['peak_reserved_gb']:>9.2f}G{r['peak_allocated_gb']:>7.2f}G"
                     f"{r['context_gb']:>8.2f}G  {'yes' if r['within_estimate'] else 'NO: the estimate is low'}")
    good = [r for r in rows if "error" not in r]
    if good:
        lines.append(f"measured on {good[0]['device_name']}: 'measured' = PyTorch's reserved peak + the CUDA context "
                     f"(what nvidia-smi shows); 'estimate' = sdstudio.train.estimate for the preset as written")
    return "\n".join(lines)

