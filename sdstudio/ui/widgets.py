"""Small view helpers that several tabs share."""
from __future__ import annotations

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
