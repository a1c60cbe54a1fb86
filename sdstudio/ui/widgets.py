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


def only_changed(seen: dict | None, values: dict) -> tuple[list, dict]:
    """A poll's outputs, each replaced by gr.skip() when the page already shows it; and the new `seen` (a
    digest per output, kept in a gr.State). Every update costs the browser a walk of the whole component tree,
    so a 0.5 s poll that resends unchanged values makes a busy machine's page lag by seconds (Stop then answers
    late)."""
    import gradio as gr

    seen = dict(seen or {})
    out = []
    for name, value in values.items():
        digest = _digest(value)
        if digest is not None and seen.get(name) == digest:
            out.append(gr.skip())
        else:
            out.append(value)
            if digest is not None:
                seen[name] = digest
    return out, seen


def _digest(value) -> str | None:
    """A short fingerprint of an output value; None for what cannot be compared (always sent)."""
    import hashlib

    if isinstance(value, pd.DataFrame):
        text = value.to_json()
    elif isinstance(value, (str, int, float, bool, list, tuple, type(None))):
        text = repr(value)
    else:
        return None
    return hashlib.sha1(text.encode("utf-8", "replace")).hexdigest()[:16]


class PageMemory:
    """What each open page already shows, kept on the server by the page's session (a gr.State output would
    cost the browser a walk of its whole component tree on every poll). Bounded: old sessions fall out."""

    def __init__(self, max_pages: int = 64) -> None:
        import collections
        import threading

        self._pages: "collections.OrderedDict[str, dict]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self._max = max_pages

    def of(self, request) -> dict:
        key = getattr(request, "session_hash", None) or "-"
        with self._lock:
            page = self._pages.pop(key, None)
            page = {} if page is None else page
            self._pages[key] = page
            while len(self._pages) > self._max:
                self._pages.popitem(last=False)
            return page

    def forget(self, request) -> None:
        """A fresh page (loaded or reloaded): draw everything again."""
        with self._lock:
            self._pages.pop(getattr(request, "session_hash", None) or "-", None)
