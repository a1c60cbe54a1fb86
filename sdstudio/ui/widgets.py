"""Small view helpers that several tabs share."""
from __future__ import annotations

import html

import pandas as pd


def loss_frame(steps: list) -> pd.DataFrame | None:
    # None, not an empty frame: Gradio 6.31 fixes a plot's colour domain from its first value, so a plot that
    # starts from an empty frame never draws its lines.
    if not steps:
        return None
    xs = [s[0] for s in steps]
    raw = [s[1] for s in steps]
    smooth, acc = [], None
    for v in raw:  # exponential smoothing, as TensorBoard does
        acc = v if acc is None else 0.9 * acc + 0.1 * v
        smooth.append(acc)
    if len(xs) > 2000:  # a long run: thin the points the browser draws (the smoothing used all of them)
        k = len(xs) // 2000 + 1
        xs, raw, smooth = xs[::k] + xs[-1:], raw[::k] + raw[-1:], smooth[::k] + smooth[-1:]
    return pd.DataFrame({"step": xs + xs, "loss": raw + smooth,
                         "series": ["raw"] * len(xs) + ["smoothed"] * len(xs)})


def progress_html(done: float, total: float, text: str, text_id: str) -> str:
    """A thin progress bar with a line of text under it (its element id lets browser tests read it)."""
    pct = 100.0 * done / total if total else 0.0
    return (f'<div class="sd-progress"><div style="background:var(--color-accent);height:10px;width:{pct:.1f}%;'
            f'border-radius:4px"></div></div><div id="{text_id}">{html.escape(text)}</div>')


def fmt_eta(seconds) -> str:
    """`1h05m` or `3m07s`; `?` before the first estimate."""
    if seconds is None:
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
