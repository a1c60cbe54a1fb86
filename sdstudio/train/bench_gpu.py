"""`sdstudio bench train --arch sd15,sdxl --device cuda`: our loop beside a plain diffusers loop on the full-size
architectures (random weights), for each memory preset; `--speed`: each speed option against the same run
without it.

Rows come from the presets: for each memory size (6, 8, 12, 24 GB) the largest `character-lora-<arch>-<N>gb`
preset with N <= the size, as the Quick wizard picks them, plus a throughput row (the 8 GB preset at batch 8).
A family with no such preset (none since the SDXL presets landed) runs `FALLBACK_PRESET`'s low-memory settings at its native
resolution, and says so. Every run is a child process (train/measure.py) so each peak is its own. Figures are
printed as one table and written as JSON (`--json`) for scripts/gpu_check.sh.
"""
from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .measure import Spec, model_flops, peak_tflops, run_isolated

MEMORY_SIZES = (6, 8, 12, 24)
ARCHS = {"sd15": ("sd1", 512), "sdxl": ("sdxl", 1024), "tiny": ("sd1", 64)}  # arch -> (family, resolution)
FALLBACK_PRESET = "character-lora-sd15-6gb"  # gradient checkpointing, caches, 8-bit Adam: the low-memory recipe
THROUGHPUT = ("character-lora-sd15-8gb", 8)  # (preset, batch): the MFU target row
# name -> the --set overrides of one speed option, each measured against the same run without it.
SPEED_OPTIONS = {
    "torch.compile (UNet)": ["compile_unet=true"],
    "channels_last": ["channels_last=true"],
    "attention = sdpa": ["attention=sdpa"],
    "SDPA flash": ["attention=sdpa_flash"],
    "SDPA mem-efficient": ["attention=sdpa_efficient"],
    "SDPA cuDNN": ["attention=sdpa_cudnn"],
    "xformers": ["attention=xformers"],
    "AdamW not fused": ["fused_optimizer=false"],
    "cuDNN benchmark": ["cudnn_benchmark=true"],
    "latent cache on GPU": ["cache_on_gpu=true"],
}


@dataclass
class Row:
    arch: str
    memory_gb: int | None  # None: the throughput row
    preset: str
    sets: list = field(default_factory=list)
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.memory_gb} GB" if self.memory_gb else "throughput"


def register_args(p) -> None:
    """The options `bench train` gains for full-size runs (train/bench.py adds them to its parser)."""
    p.add_argument("--arch", default="", help="full-size runs: sd15, sdxl or both (sd15,sdxl); tiny for a CPU "
                                              "smoke run. The presets then set resolution and batch (--base, "
                                              "--resolution, --batch-size, --images and --repeats do not apply)")
    p.add_argument("--memory", default=",".join(map(str, MEMORY_SIZES)),
                   help="memory sizes in GB whose presets run (default 6,8,12,24)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, autotuning)")
    p.add_argument("--models", type=Path, default=None,
                   help="folder of full-size models (<folder>/sd15, <folder>/sdxl); made there when missing")
    p.add_argument("--speed", action="store_true", help="instead: each speed option against the same run without it")
    p.add_argument("--speed-preset", default="", help="the row --speed measures (default: the throughput row)")
    p.add_argument("--no-throughput", action="store_true", help="skip the batch-8 throughput row")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--budget-s", type=float, default=0, help="start no run after this many seconds (0: no limit)")
    p.add_argument("--peak-tflops", type=float, default=0,
                   help="the GPU's dense fp16/bf16 peak for MFU when its name is not in measure.PEAK_TFLOPS")


# -- the models and the data ---------------------------------------------------------------------------------------

def model_for(arch: str, models: Path | None, device: str) -> str:
    """The base ref for `arch`: the tiny model, or a full-size random model folder (written once)."""
    if arch == "tiny":
        return "tiny"
    if arch not in ARCHS:
        raise UserError(f"Unknown architecture {arch!r}: use sd15, sdxl or tiny.")
    root = models or Path(tempfile.gettempdir()) / "sdstudio-bench-models"
    folder = root / arch
    if not (folder / "model_index.json").is_file():
        import torch

        from ..formats.safe_io import atomic_dir
        from ..models.full import write_full_model

        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
        print(f"building the full-size {arch} model (random weights) in {folder} ...", flush=True)
        with atomic_dir(folder) as tmp:
            write_full_model(tmp, arch, device=device, dtype=dtype)
    return str(folder)


def make_dataset(folder: Path, n: int, size: int) -> Path:
    """n square images of smooth random blobs with captions, at the training resolution (no resizing cost)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.kron(rng.random((8, 8, 3)), np.ones((size // 8, size // 8, 1)))
        Image.fromarray((img * 255).astype("uint8")).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"sks person, photo {i}", encoding="utf-8")
    return folder


# -- the rows --------------------------------------------------------------------------------------------------

def memory_presets(arch: str) -> dict[int, str]:
    """{N: preset} for the `character-lora-<arch>-<N>gb` presets (sd15 for tiny)."""
    from .config import list_presets

    fam = "sd15" if arch == "tiny" else arch
    out = {}
    for name in list_presets():
        if m := re.fullmatch(rf"character-lora-{fam}-(\d+)gb", name):
            out[int(m[1])] = name
    return out


def rows_for(arch: str, sizes: list[int], throughput: bool = True) -> list[Row]:
    _fam, res = ARCHS[arch]
    found = memory_presets(arch)
    rows: list[Row] = []
    if not found:
        return [Row(arch, min(sizes), FALLBACK_PRESET, [f"resolution={res}"],
                    note=f"no {arch} preset yet: {FALLBACK_PRESET}'s settings at {res} px")]
    if throughput and arch != "sdxl":  # first: the MFU target row must not be the one a time budget skips
        preset, batch = THROUGHPUT
        rows.append(Row(arch, None, preset, [f"batch_size={batch}"] + ([f"resolution={res}"] if arch == "tiny" else []),
                        note=f"throughput: {preset} at batch {batch}"))
    seen: set[str] = set()
    for gb in sizes:
        fits = [n for n in found if n <= gb]
        if not fits:
            continue
        preset = found[max(fits)]
        if preset in seen:
            continue  # e.g. 24 GB picks the 12 GB preset, as the wizard does: measured once
        seen.add(preset)
        rows.append(Row(arch, gb, preset, [f"resolution={res}"] if arch == "tiny" else []))
    return rows


def cpu_sets(preset: str, device: str) -> list[str]:
    """On the CPU the 8-bit optimizer cannot run: plain AdamW, the rest as the preset says."""
    from .config import read_toml

    if not str(device).startswith("cuda") and read_toml(preset).get("optimizer") == "adamw8bit":
        return ["optimizer=adamw"]
    return []


# -- running -----------------------------------------------------------------------------------------------------

class Runner:
    """Runs specs one after the other within a time budget; later ones are marked skipped."""

    def __init__(self, budget_s: float = 0, timeout_s: float = 600) -> None:
        self.t0 = time.time()
        self.budget_s, self.timeout_s = budget_s, timeout_s

    def __call__(self, spec: Spec) -> dict:
        if self.budget_s and time.time() - self.t0 > self.budget_s:
            return {"variant": spec.variant, "preset": spec.preset, "error": "skipped: time budget spent"}
        print(f"  running {spec.variant} {spec.preset} {' '.join(spec.sets)}", flush=True)
        return run_isolated(spec, timeout=self.timeout_s)


def with_mfu(result: dict, base: str, peak: float | None) -> dict:
    """Add model FLOPs per sample and MFU (None where the peak is unknown or the run is fp32)."""
    if "error" in result:
        return result
    flops = model_flops(base, result["resolution"], rank=result.get("rank") or 16, te_trains=result["te_trains"])
    achieved = flops * result["samples_per_s"]
    half = result.get("precision") != "fp32" and "CPU" not in result.get("device_name", "")
    out = dict(result, flops_per_sample=flops, achieved_tflops=achieved / 1e12)
    out["mfu"] = achieved / (peak * 1e12) if peak and half else None
    return out


def run_matrix(args) -> int:
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    sizes = [int(x) for x in str(args.memory).split(",") if x.strip()]
    runner = Runner(args.budget_s)
    results = []
    with tempfile.TemporaryDirectory(prefix="sdstudio-bench-") as tmp:
        for arch in archs:
            if arch not in ARCHS:
                raise UserError(f"Unknown architecture {arch!r}: use sd15, sdxl or tiny.")
            base = model_for(arch, args.models, args.device)
            rows = rows_for(arch, sizes, throughput=not args.no_throughput)
            if args.speed:
                rows = [_speed_row(arch, rows, args.speed_preset)]
            ds = make_dataset(Path(tmp) / f"ds-{arch}", max(8, *(_batch(r) for r in rows)), ARCHS[arch][1])
            peak = args.peak_tflops or None
            for row in rows:
                variants = _speed_variants(args.device) if args.speed else {"ours": [], "reference": []}
                for name, extra in variants.items():
                    variant = "reference" if name == "reference" else "ours"
                    warm = max(args.warmup, 3 if "compile_unet=true" in extra else 0)
                    spec = Spec(variant=variant, base=base, dataset=str(ds), out=str(Path(tmp) / f"run-{len(results)}"),
                                preset=row.preset, sets=row.sets + cpu_sets(row.preset, args.device) + extra,
                                warmup=warm, steps=args.steps, device=args.device)
                    got = runner(spec)
                    peak = peak or (peak_tflops(got.get("device_name", "")) if "error" not in got else None)
                    results.append(dict(with_mfu(got, base, peak), arch=arch, row=row.label, note=row.note,
                                        option=name))
    _ratios(results, speed=args.speed)
    print(format_table(results, speed=args.speed))
    if args.json:
        from ..formats.safe_io import atomic_write_text

        atomic_write_text(args.json, json.dumps({"kind": "speed" if args.speed else "train", "results": results},
                                                indent=1))
    return 0


def _batch(row: Row) -> int:
    from .config import read_toml

    for s in row.sets:
        if s.startswith("batch_size="):
            return int(s.split("=", 1)[1])
    return int(read_toml(row.preset).get("batch_size", 1))


def _speed_row(arch: str, rows: list[Row], preset: str) -> Row:
    if preset:
        return next((r for r in rows if r.preset == preset and r.memory_gb), Row(arch, None, preset))
    return next((r for r in rows if r.memory_gb is None), rows[0])


# On a CPU (a smoke run) these are refused, do nothing, or (inductor) build C++ for minutes: not run there.
NOT_ON_CPU = {"SDPA mem-efficient", "SDPA cuDNN", "xformers", "cuDNN benchmark", "latent cache on GPU",
              "torch.compile (UNet)"}


def _speed_variants(device: str = "cuda") -> dict[str, list[str]]:
    from ..devices import has_xformers

    # Without xformers, "auto" (the baseline) already is SDPA: neither xformers nor "sdpa" has anything to add.
    skip = set() if has_xformers() else {"xformers", "attention = sdpa"}
    if not str(device).startswith("cuda"):
        skip |= NOT_ON_CPU
    out = {"baseline": []}
    out.update({k: v for k, v in SPEED_OPTIONS.items() if k not in skip})
    return out


def _ratios(results: list[dict], speed: bool) -> None:
    """ours/reference per row (speed and memory), or option/baseline for --speed."""
    by_row: dict[tuple, dict] = {}
    anchor = "baseline" if speed else "reference"
    for r in results:
        if r.get("option") == anchor and "error" not in r:
            by_row[(r["arch"], r["row"])] = r
    for r in results:
        ref = by_row.get((r["arch"], r["row"]))
        if ref is None or "error" in r or r is ref:
            continue
        r["speed_ratio"] = r["samples_per_s"] / ref["samples_per_s"]
        r["memory_ratio"] = r["peak_reserved_gb"] / ref["peak_reserved_gb"] if ref["peak_reserved_gb"] else None


def _f(v, fmt: str, none: str = "-") -> str:
    return none if v is None else format(v, fmt)


def format_table(results: list[dict], speed: bool = False) -> str:
    head = ("option" if speed else "variant")
    lines = [f"{'arch':<6}{'row':<11}{head:<22}{'preset':<27}{'batch':>6}{'px':>6}{'step/s':>8}{'img/s':>8}"
             f"{'alloc GB':>9}{'resv GB':>9}{'MFU':>7}{'x base' if speed else 'x ref':>7}{'mem x':>7}"]
    for r in results:
        name = r.get("option") if speed else r.get("variant")
        if "error" in r:
            lines.append(f"{r.get('arch', ''):<6}{r.get('row', ''):<11}{name:<22}{r.get('preset', ''):<27}  "
                         f"{r['error']}")
            continue
        mfu = "-" if r.get("mfu") is None else f"{r['mfu'] * 100:.1f}%"
        lines.append(f"{r['arch']:<6}{r['row']:<11}{name:<22}{r['preset']:<27}{r['batch']:>6}{r['resolution']:>6}"
                     f"{r['steps_per_s']:>8.2f}{r['samples_per_s']:>8.2f}{r['peak_allocated_gb']:>9.2f}"
                     f"{r['peak_reserved_gb']:>9.2f}{mfu:>7}{_f(r.get('speed_ratio'), '.2f'):>7}"
                     f"{_f(r.get('memory_ratio'), '.2f'):>7}")
    notes = sorted({r["note"] for r in results if r.get("note")})
    lines += [f"note: {n}" for n in notes]
    if results and "error" not in results[0]:
        lines.append(f"device: {results[0].get('device_name', '?')}; MFU = model FLOPs per sample (meta-device "
                     f"FlopCounter) x samples/s / the GPU's dense bf16/fp16 peak")
    return "\n".join(lines)
