"""The weight change each adapter algorithm makes: the one place this maths lives.

Every function takes a module's tensors as the files name them (kohya / LyCORIS keys) and returns the change
to the base weight, shaped like it, *before* the alpha/rank scale (the caller multiplies by it; see
`Adapter.scale`). Training, the Playground, EDLoRA, fusion and the AdaLoRA export all rebuild deltas here, and
tests/test_adapters_lycoris.py checks each against LyCORIS' own functional code (the `lycoris-lora` package).

Conventions, as LyCORIS writes them and A1111 / ComfyUI read them:
- LoRA / LoCon: up (out, r[, 1, 1]) @ down (r, in[, k, k]); Tucker convs add mid (r, r, k, k) with 1x1 down/up.
- LoHa: (w1_a @ w1_b) * (w2_a @ w2_b), element-wise; Tucker convs: w_a (r, out), w_b (r, in), t (r, r, k, k).
- LoKr: kron(w1, w2); either factor may be stored whole or as a low-rank pair (w_a @ w_b), and w2 of a conv
  may be Tucker (t2 (r, r, k, k), w2_a (r, b), w2_b (r, d)).
- DoRA (weight-decomposed): the merged weight W + dW is renormalised to the stored magnitude (`dora_scale`)
  per output channel (shape (out, 1, ...), LyCORIS >= 3) or per input channel (shape (1, in, ...), older files).
- AdaLoRA: B @ (A * E), the SVD form peft trains.
"""
from __future__ import annotations

import torch


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into (m, n), m <= n, m * n == dimension, the way LyCORIS' LoKr does.

    A positive `factor` that divides `dimension` is used as is; otherwise m walks up the divisors of
    `dimension` while it stays <= `factor` (no limit when factor < 0) and below n, ending near the square root.
    E.g. 320 -> (16, 20); with factor 8 -> (8, 40); 127 -> (1, 127)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        nxt = m + 1
        while dimension % nxt:
            nxt += 1
        if nxt > limit:
            break
        m, n = nxt, dimension // nxt
    return (m, n) if m <= n else (n, m)


def tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A Tucker core t (r, r, k, k) with its two mode factors wa (r, out) and wb (r, in) -> (out, in, k, k)."""
    return torch.einsum("ij...,ip,jr->pr...", t, wa, wb)


def lora_weight(down: torch.Tensor, up: torch.Tensor, mid: torch.Tensor | None = None,
                shape: tuple | None = None) -> torch.Tensor:
    """up @ down (LoRA, LoCon), or the Tucker LoCon mid x up x down; shaped `shape` (else up/down's own)."""
    if mid is not None:
        w = tucker(mid, up.flatten(1).T, down.flatten(1))
    else:
        w = up.flatten(1) @ down.flatten(1)
        w = w.reshape(up.shape[0], down.shape[1], *down.shape[2:])
    return w.reshape(shape) if shape is not None else w


def loha_weight(w1_a, w1_b, w2_a, w2_b, t1=None, t2=None, shape: tuple | None = None) -> torch.Tensor:
    """The Hadamard product of two low-rank matrices (LoHa); Tucker cores for 3x3 convs."""
    if t1 is not None:
        w = tucker(t1, w1_a, w1_b) * tucker(t2, w2_a, w2_b)
    else:
        w = (w1_a @ w1_b) * (w2_a @ w2_b)
    return w.reshape(shape) if shape is not None else w


def lokr_factor(w=None, w_a=None, w_b=None, t=None) -> torch.Tensor:
    """One Kronecker factor: stored whole, as a low-rank pair w_a @ w_b, or (w2 of a conv) Tucker."""
    if w is not None:
        return w
    if t is not None:
        return tucker(t, w_a, w_b)
    return (w_a @ w_b.flatten(1)).reshape(w_a.shape[0], *w_b.shape[1:])


def lokr_weight(w1=None, w1_a=None, w1_b=None, w2=None, w2_a=None, w2_b=None, t2=None,
                shape: tuple | None = None) -> torch.Tensor:
    """kron(w1, w2) (LoKr). A conv's w2 keeps its kernel axes (or has them flattened into its columns)."""
    a = lokr_factor(w1, w1_a, w1_b)
    b = lokr_factor(w2, w2_a, w2_b, t2)
    a = a.reshape(*a.shape, *([1] * (b.ndim - a.ndim)))
    w = torch.kron(a.contiguous(), b.contiguous())  # kron views its inputs: a Tucker rebuild is not contiguous
    return w.reshape(shape) if shape is not None else w


def svd_weight(a: torch.Tensor, e: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """AdaLoRA's B @ (A * E): A (r, in), E (r, 1) the singular values, B (out, r)."""
    return b @ (a * e)


def svd_as_lora(a: torch.Tensor, e: torch.Tensor, b: torch.Tensor, scale: float = 1.0,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaLoRA's scale x B (A * E) as a plain low-rank pair (down, up) at the kept rank: down = (A * E)[keep],
    up = scale x B[:, keep]. Its lora_weight equals svd_weight with the cut singular values at zero."""
    keep = (e.reshape(-1) != 0) if keep is None else keep.reshape(-1).bool()
    return (a * e)[keep], b[:, keep] * scale


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA: (W + dW) rescaled so each output channel's norm is `magnitude` (or each input channel's, when the
    magnitude is shaped (1, in, ...), as LyCORIS wrote it before 3.0). Computed in float32."""
    merged = weight.float() + delta.float()
    m = magnitude.float()
    if m.shape[0] == merged.shape[0]:  # the output axis (ComfyUI decides the same way)
        norm = merged.flatten(1).norm(dim=1).reshape(-1, *([1] * (merged.ndim - 1)))
    else:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *([1] * (merged.ndim - 2)))
    norm = norm + torch.finfo(torch.float32).eps
    return merged * (m.reshape(norm.shape) / norm)


def dora_magnitude(weight: torch.Tensor) -> torch.Tensor:
    """The magnitude DoRA starts from: each output channel's norm of the base weight, shaped (out, 1, ...)."""
    w = weight.detach().float()
    return w.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.ndim - 1)))
