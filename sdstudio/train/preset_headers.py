"""The presets' measured-memory header lines, generated from `presets/measured-vram.json` (written by
`sdstudio bench vram`), never typed by hand.

A preset with a measurement ends its header with a `# Measured VRAM:` block; one without has none, and its
estimate line keeps saying it is unmeasured. `sync_headers()` rewrites exactly that block (and, once measured,
the words "not yet measured on a GPU"), so the other header lines stay as people wrote them.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

from .config import PRESETS_DIR

MEASUREMENTS = PRESETS_DIR / "measured-vram.json"
PREFIX = "# Measured VRAM:"
CONTINUATION = "#   "
UNMEASURED = "not yet measured on a GPU"
MEASURED_NOTE = "VRAM measured on a GPU: see the last header line"


def read_measurements(path: Path | None = None) -> dict:
    """{preset name: measurement} (an absent file: no measurement yet)."""
    path = path or MEASUREMENTS
    if not Path(path).is_file():
        return {}
    return json.loads(Path(path).read_text(encoding="utf-8")).get("presets", {})


def measured_block(m: dict) -> list[str]:
    """The header lines for one measurement, wrapped like the hand-written ones."""
    text = (f"{PREFIX} {m['total_gb']:.1f} GB peak ({m['peak_reserved_gb']:.1f} GB reserved by PyTorch, "
            f"{m['peak_allocated_gb']:.1f} GB of it allocated, + {m['context_gb']:.1f} GB CUDA context) at "
            f"{m['resolution']} px, batch {m['batch']}, on {m['device_name']} with torch {m['torch']}; "
            f"estimated {m['estimate_gb']:.1f} GB (sdstudio bench vram, {m['date']}).")
    lines = textwrap.wrap(text, width=116, subsequent_indent=CONTINUATION)
    return lines


def render(text: str, m: dict | None) -> str:
    """`text` (a preset file) with its measured block for `m` (None: without one)."""
    lines = text.splitlines()
    n = next((i for i, ln in enumerate(lines) if not ln.startswith("#")), len(lines))
    header, body = lines[:n], lines[n:]
    kept, skipping = [], False
    for ln in header:  # drop the old block: its first line and its continuations
        if ln.startswith(PREFIX):
            skipping = True
            continue
        if skipping and ln.startswith(CONTINUATION):
            continue
        skipping = False
        kept.append(ln)
    if m is not None:
        kept = [ln.replace(UNMEASURED, MEASURED_NOTE) for ln in kept] + measured_block(m)
    else:
        kept = [ln.replace(MEASURED_NOTE, UNMEASURED) for ln in kept]
    return "\n".join(kept + body) + ("\n" if text.endswith("\n") else "")


def sync_headers(measurements: dict | None = None, presets_dir: Path | None = None) -> list[str]:
    """Rewrite every preset whose header disagrees with the measurements; returns the names changed."""
    from ..formats.safe_io import atomic_write_text

    measurements = read_measurements(MEASUREMENTS) if measurements is None else measurements
    changed = []
    for path in sorted(Path(presets_dir or PRESETS_DIR).glob("*.toml")):
        text = path.read_text(encoding="utf-8")
        new = render(text, measurements.get(path.stem))
        if new != text:
            atomic_write_text(path, new)
            changed.append(path.stem)
    return changed
