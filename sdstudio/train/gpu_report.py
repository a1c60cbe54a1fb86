"""The one table scripts/gpu_check.sh prints at the end: its steps, the gpu tests, the training benchmarks
(ours beside the plain diffusers loop), the speed options, the presets' measured memory, and issue #18's
targets, read from the files the steps wrote into the output folder.

    python -m sdstudio.train.gpu_report OUT_DIR
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# Issue #18's targets, as bench output (never as timed tests).
SIX_GB_PEAK_GB = 4.0  # SD 1.5 LoRA, 512 px, batch 1, the 6 GB preset (kohya's best reported: about 4 GB)
SDXL_EIGHT_GB_PEAK_GB = 8.0  # SDXL LoRA, 1024 px, batch 1, the 8 GB preset
THROUGHPUT_MFU = 0.45  # SD 1.5 LoRA at batch 8 on an H100/H200
OURS_OVER_REFERENCE = 1.2  # ours / the plain diffusers loop, at equal memory


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def steps_section(out: Path) -> list[str]:
    lines = ["STEP                          RESULT      SECONDS"]
    path = out / "steps.tsv"
    if not path.is_file():
        return lines + ["(no steps recorded)"]
    for row in path.read_text(encoding="utf-8").splitlines():
        name, rc, secs, *rest = row.split("\t") + [""]
        result = {"0": "ok", "skip": "skipped", "124": "TIME OUT", "137": "KILLED"}.get(rc, f"FAILED ({rc})")
        lines.append(f"{name:<30}{result:<12}{float(secs or 0):>7.0f}")
    return lines


def pytest_section(out: Path) -> list[str]:
    path = out / "pytest-gpu.xml"
    if not path.is_file():
        return ["GPU TESTS: not run"]
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    lines = [f"GPU TESTS (pytest -m gpu): {passed} passed, {counts['failures'] + counts['errors']} failed, "
             f"{counts['skipped']} skipped"]
    for case in root.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            first = (bad.get("message") or "").splitlines()[:1]
            lines.append(f"  FAILED {case.get('classname', '').split('.')[-1]}::{case.get('name')}: "
                         f"{first[0][:150] if first else ''}")
    return lines


def train_section(results: list[dict], title: str) -> list[str]:
    from .bench_gpu import format_table

    return [title, format_table(results, speed=title.startswith("SPEED"))] if results else [title, "(not run)"]


def vram_section(data: dict | None) -> list[str]:
    from .bench_vram import format_table

    rows = (data or {}).get("last_run") or []
    return ["PRESETS' PEAK MEMORY (bench vram)", format_table(rows) if rows else "(not run)"]


def targets_section(train: list[dict], vram: dict | None) -> list[str]:
    def fmt(ok, text):
        return f"  {'PASS' if ok else 'MISS' if ok is False else 'n/a '}  {text}"

    lines = ["ISSUE #18 TARGETS"]
    six = next((r for r in (vram or {}).get("last_run", []) if r.get("preset") == "character-lora-sd15-6gb"
                and "error" not in r), None)
    lines.append(fmt(six and six["total_gb"] <= SIX_GB_PEAK_GB,
                     f"SD 1.5 LoRA 512 px batch 1, 6 GB preset: peak <= {SIX_GB_PEAK_GB:g} GB: "
                     + (f"{six['total_gb']:.2f} GB (reserved + context)" if six else "not measured")))
    xl = [r for r in (vram or {}).get("last_run", []) if r.get("arch") == "sdxl" and "8gb" in r.get("preset", "")]
    xl_ok = [r for r in xl if "error" not in r]
    lines.append(fmt(xl_ok[0]["total_gb"] <= SDXL_EIGHT_GB_PEAK_GB if xl_ok else None,
                     f"SDXL LoRA 1024 px batch 1, 8 GB preset: peak <= {SDXL_EIGHT_GB_PEAK_GB:g} GB: "
                     + (f"{xl_ok[0]['total_gb']:.2f} GB" if xl_ok else
                        xl[0].get("error", "no SDXL 8 GB preset yet") if xl else "no SDXL 8 GB preset yet")))
    tp = next((r for r in train if r.get("row") == "throughput" and r.get("variant") == "ours" and r.get("arch") ==
               "sd15" and "error" not in r), None)
    mfu = tp.get("mfu") if tp else None
    lines.append(fmt(mfu >= THROUGHPUT_MFU if mfu is not None else None,
                     f"SD 1.5 LoRA batch 8: MFU >= {THROUGHPUT_MFU:.0%}: " +
                     (f"{mfu:.1%} ({tp['samples_per_s']:.0f} samples/s)" if mfu is not None else "not measured")))
    for r in train:
        if r.get("variant") == "ours" and "speed_ratio" in r:
            mem = r.get("memory_ratio")
            lines.append(fmt(r["speed_ratio"] >= OURS_OVER_REFERENCE and (mem is None or mem <= 1.05),
                             f"{r['arch']} {r['row']} ({r['preset']}): ours/plain diffusers >= "
                             f"{OURS_OVER_REFERENCE}x at equal memory: {r['speed_ratio']:.2f}x speed, "
                             f"{'-' if mem is None else f'{mem:.2f}x'} memory"))
    return lines


def build_report(out: Path) -> str:
    out = Path(out)
    env = (out / "env.txt").read_text(encoding="utf-8").strip() if (out / "env.txt").is_file() else ""
    train, speed = [], []
    for name in ("train-sd15.json", "train-sdxl.json"):
        train += (_load(out / name) or {}).get("results", [])
    speed = (_load(out / "speed.json") or {}).get("results", [])
    vram = _load(out / "measured-vram.json")
    parts = [["GPU CHECK (scripts/gpu_check.sh)", env], steps_section(out), pytest_section(out),
             train_section(train, "TRAINING: ours beside a plain diffusers LoRA loop (full-size, random weights)"),
             train_section(speed, "SPEED OPTIONS: each against the same run without it"), vram_section(vram),
             targets_section(train, vram)]
    bar = "=" * 118
    return "\n".join([bar] + [("\n".join(p)).rstrip() + "\n" + bar for p in parts])


def main(argv: list[str]) -> int:
    print(build_report(Path(argv[0] if argv else ".")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
