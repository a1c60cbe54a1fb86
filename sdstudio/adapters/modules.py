"""One module's adapter, per algorithm: its tensors as parameters named like the file keys, its alpha, and
(DoRA) the magnitude it renormalises to. `delta(W)` is the weight change it makes to a base weight W, scale
included; the maths is in maths.py.

Adapters are made two ways: `new_*` for training (initialised as LyCORIS / peft initialise them, so a fresh
adapter changes nothing), and `from_state` for a file's tensors (any layout LyCORIS, kohya or peft write).
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from . import maths


class Adapter(nn.Module):
    """Base class: alpha/rank scale, the optional DoRA magnitude, the file view of the tensors."""

    algorithm: ClassVar[str] = ""
    KEYS: ClassVar[tuple[str, ...]] = ()  # parameter names, which are also the file keys (without ".weight")

    def __init__(self, alpha: float | None, rank: int | None) -> None:
        super().__init__()
        self.rank = rank
        self.alpha = float(alpha) if alpha is not None else float(rank or 1)
        self.register_parameter("dora_scale", None)

    @property
    def scale(self) -> float:
        """alpha / rank, as kohya, LyCORIS, A1111 and ComfyUI scale every algorithm (1 with no rank)."""
        return self.alpha / self.rank if self.rank else 1.0

    def _set(self, name: str, value: torch.Tensor | None, trainable: bool) -> None:
        self.register_parameter(name, None if value is None else nn.Parameter(value, requires_grad=trainable))

    def tensor(self, name: str) -> torch.Tensor | None:
        return self._parameters.get(name)

    def weight(self, shape: tuple) -> torch.Tensor:
        """The unscaled weight change, shaped `shape`."""
        raise NotImplementedError

    def delta(self, base_weight: torch.Tensor) -> torch.Tensor:
        """What this adapter adds to `base_weight` at full strength (scale, and DoRA's renormalisation, in)."""
        d = self.weight(tuple(base_weight.shape)) * self.scale
        if self.dora_scale is None:
            return d
        return maths.dora_weight(base_weight, d, self.dora_scale) - base_weight.float()

    def state(self) -> dict[str, torch.Tensor]:
        """{file key: tensor}: the LyCORIS / kohya names, `alpha` and `dora_scale` included."""
        out = {self.file_key(k): p.detach() for k, p in self._parameters.items() if p is not None}
        out["alpha"] = torch.tensor(self.alpha)
        return out

    @staticmethod
    def file_key(name: str) -> str:
        return name

    def add_magnitude(self, base_weight: torch.Tensor, trainable: bool = True) -> None:
        """Make this a DoRA adapter: its magnitude starts as the base weight's per-output-channel norm."""
        self._set("dora_scale", maths.dora_magnitude(base_weight), trainable)

    def extra_repr(self) -> str:
        return f"{self.algorithm}, rank={self.rank}, alpha={self.alpha:g}" + (", dora" if self.dora_scale is not None
                                                                             else "")


class LoRA(Adapter):
    """up @ down (LoRA, and LoCon on convolutions); a Tucker LoCon has a kxk mid between 1x1 down and up."""

    algorithm = "lora"
    KEYS = ("lora_down", "lora_up", "lora_mid")

    def __init__(self, down, up, mid=None, alpha=None, trainable=False, dropout: float = 0.0) -> None:
        super().__init__(alpha, int(down.shape[0]))
        self._set("lora_down", down, trainable)
        self._set("lora_up", up, trainable)
        self._set("lora_mid", mid, trainable)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @staticmethod
    def file_key(name: str) -> str:
        return name + ".weight" if name.startswith("lora_") else name

    @property
    def plain(self) -> bool:
        """A low-rank pair the layer may run as a branch (or concatenate with others): no mid, no DoRA."""
        return self.lora_mid is None and self.dora_scale is None

    def weight(self, shape):
        return maths.lora_weight(self.lora_down, self.lora_up, self.lora_mid, shape)

    def branch(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """up(down(x)), unscaled, with the base's stride and padding on a conv."""
        down, up = self.lora_down, self.lora_up
        x = self.dropout(x.to(down.dtype))
        if down.ndim == 2:
            return F.linear(F.linear(x, down), up)
        if self.lora_mid is not None:
            h = F.conv2d(x, down)
            h = F.conv2d(h, self.lora_mid, None, base.stride, base.padding, base.dilation)
        else:
            h = F.conv2d(x, down, None, base.stride, base.padding, base.dilation)
        return F.conv2d(h, up)


class LoHa(Adapter):
    """(w1_a @ w1_b) * (w2_a @ w2_b): the Hadamard product of two low-rank pairs (LyCORIS LoHa)."""

    algorithm = "loha"
    KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def __init__(self, w1_a, w1_b, w2_a, w2_b, t1=None, t2=None, alpha=None, trainable=False) -> None:
        super().__init__(alpha, int(w1_b.shape[0]))
        for name, value in zip(self.KEYS, (w1_a, w1_b, w2_a, w2_b, t1, t2)):
            self._set(name, value, trainable)

    def weight(self, shape):
        return maths.loha_weight(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.hada_t1,
                                 self.hada_t2, shape)


class LoKr(Adapter):
    """kron(w1, w2) (LyCORIS LoKr): each factor whole or a low-rank pair; a conv's w2 may be Tucker."""

    algorithm = "lokr"
    KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def __init__(self, w1=None, w1_a=None, w1_b=None, w2=None, w2_a=None, w2_b=None, t2=None, alpha=None,
                 trainable=False) -> None:
        # The rank of the factor stored as a pair (w2's, else w1's); with both whole there is none and the
        # scale is 1, whatever alpha says (LyCORIS, A1111 and ComfyUI agree).
        rank = int(w2_b.shape[0]) if w2_b is not None else int(w1_b.shape[0]) if w1_b is not None else None
        super().__init__(alpha, rank)
        for name, value in zip(self.KEYS, (w1, w1_a, w1_b, w2, w2_a, w2_b, t2)):
            self._set(name, value, trainable)

    @property
    def factors(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """((a, c), (b, d)): the shapes of w1 and of w2's matrix part (out = a*b, in = c*d[*k*k])."""
        w1 = self.lokr_w1 if self.lokr_w1 is not None else None
        a, c = w1.shape if w1 is not None else (self.lokr_w1_a.shape[0], self.lokr_w1_b.shape[1])
        if self.lokr_w2 is not None:
            b, d = self.lokr_w2.shape[:2]
        elif self.lokr_t2 is not None:
            b, d = self.lokr_w2_a.shape[1], self.lokr_w2_b.shape[1]
        else:
            b, d = self.lokr_w2_a.shape[0], self.lokr_w2_b.shape[1]
        return (int(a), int(c)), (int(b), int(d))

    def weight(self, shape):
        return maths.lokr_weight(self.lokr_w1, self.lokr_w1_a, self.lokr_w1_b, self.lokr_w2, self.lokr_w2_a,
                                 self.lokr_w2_b, self.lokr_t2, shape)


ALGORITHMS: dict[str, type[Adapter]] = {cls.algorithm: cls for cls in (LoRA, LoHa, LoKr)}


# -- new adapters for training ----------------------------------------------------------------------------

def _dims(base: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    w = base.weight
    return int(w.shape[0]), int(w.shape[1]), tuple(int(k) for k in w.shape[2:])


def _kaiming(*shape) -> torch.Tensor:
    t = torch.empty(*shape)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t


def new_lora(base: nn.Module, rank: int, alpha: float, *, tucker: bool = False, dora: bool = False,
             dropout: float = 0.0, init: str = "gaussian") -> LoRA:
    """A LoRA to train: down ~ N(0, 1/rank) (peft's "gaussian"; `init="kaiming"`: nn.Linear's own init, as
    LyCORIS and Mix-of-Show start), up = 0, so it starts as no change. Convolutions get a LoCon (down with the
    base's kernel, 1x1 up), or with `tucker` a 1x1 down, kxk mid and 1x1 up. `dora` adds the magnitude."""
    out_dim, in_dim, k = _dims(base)
    spatial = bool(k) and any(s != 1 for s in k)

    def down_init(*shape):
        return _kaiming(*shape) if init == "kaiming" else torch.randn(*shape) / rank

    if tucker and spatial:
        down = down_init(rank, in_dim, 1, 1)
        mid = _kaiming(rank, rank, *k)
        up = torch.zeros(out_dim, rank, 1, 1)
    else:
        down = down_init(rank, in_dim, *k)
        mid = None
        up = torch.zeros(out_dim, rank, *([1] * len(k)))
    a = LoRA(down, up, mid, alpha=alpha, trainable=True, dropout=dropout)
    if dora:
        a.add_magnitude(base.weight)
    return a


def new_loha(base: nn.Module, rank: int, alpha: float, *, tucker: bool = False, dora: bool = False) -> LoHa:
    """A LoHa to train, initialised as LyCORIS does: w1_b, w2_b ~ N(0, 1), w1_a ~ N(0, 0.1), w2_a = 0 (so it
    starts as no change); Tucker cores ~ N(0, 0.1) on kxk convs when `tucker`."""
    out_dim, in_dim, k = _dims(base)
    if tucker and k and any(s != 1 for s in k):
        t1, t2 = torch.randn(rank, rank, *k) * 0.1, torch.randn(rank, rank, *k) * 0.1
        w1_a, w2_a = torch.randn(rank, out_dim) * 0.1, torch.zeros(rank, out_dim)
        w1_b, w2_b = torch.randn(rank, in_dim), torch.randn(rank, in_dim)
    else:
        flat = in_dim * math.prod(k)
        t1 = t2 = None
        w1_a, w2_a = torch.randn(out_dim, rank) * 0.1, torch.zeros(out_dim, rank)
        w1_b, w2_b = torch.randn(rank, flat), torch.randn(rank, flat)
    a = LoHa(w1_a, w1_b, w2_a, w2_b, t1, t2, alpha=alpha, trainable=True)
    if dora:
        a.add_magnitude(base.weight)
    return a


def new_lokr(base: nn.Module, rank: int, alpha: float, *, factor: int = -1, decompose_both: bool = False,
             full_matrix: bool = False, tucker: bool = False, dora: bool = False) -> LoKr:
    """A LoKr to train, laid out and initialised as LyCORIS does.

    out = a*b and in = c*d, each split by `factor` (maths.factorization). w1 (a, c) is whole, or a low-rank
    pair when `decompose_both` and rank < max(a, c)/2. w2 (b, d[, k, k]) is a low-rank pair unless
    `full_matrix` or rank >= max(b, d)/2 (then whole); on a kxk conv with `tucker` the pair gets a Tucker core.
    w2 (or w2_b) starts at zero, so the adapter starts as no change."""
    out_dim, in_dim, k = _dims(base)
    a, b = maths.factorization(out_dim, factor)
    c, d = maths.factorization(in_dim, factor)
    w1 = w1_a = w1_b = w2 = w2_a = w2_b = t2 = None
    if decompose_both and rank < max(a, c) / 2 and not full_matrix:
        w1_a, w1_b = _kaiming(a, rank), _kaiming(rank, c)
    else:
        w1 = _kaiming(a, c)
    if full_matrix or rank >= max(b, d) / 2:
        w2 = torch.zeros(b, d, *k)
    elif tucker and k and any(s != 1 for s in k):
        t2, w2_a, w2_b = _kaiming(rank, rank, *k), _kaiming(rank, b), torch.zeros(rank, d)
    else:
        w2_a, w2_b = _kaiming(b, rank), torch.zeros(rank, d * math.prod(k))
    adapter = LoKr(w1, w1_a, w1_b, w2, w2_a, w2_b, t2, alpha=alpha, trainable=True)
    if dora:
        adapter.add_magnitude(base.weight)
    return adapter


# -- adapters from a file's tensors -----------------------------------------------------------------------

def from_state(algorithm: str, tensors: dict[str, torch.Tensor], base_shape: tuple,
               alpha: float | None = None) -> Adapter:
    """An adapter (not trainable) from one module's tensors, named as the files name them without ".weight"
    (lora_down, hada_w1_a, lokr_w2_b, dora_scale, ...). LoRA tensors are reshaped to fit the base (a 1x1 conv
    LoRA on a Linear, as SD1 and SD2 differ in proj_in/proj_out, and back)."""
    t = {k: v for k, v in tensors.items() if v is not None}
    if algorithm == "lora":
        down, up, mid = t["lora_down"], t["lora_up"], t.get("lora_mid")
        if len(base_shape) == 2:
            down, up = down.flatten(1), up.flatten(1)
        elif down.ndim == 2:
            down, up = down[:, :, None, None], up[:, :, None, None]
        adapter: Adapter = LoRA(down, up, mid, alpha=alpha)
    elif algorithm == "loha":
        adapter = LoHa(*(t.get(k) for k in LoHa.KEYS), alpha=alpha)
    elif algorithm == "lokr":
        adapter = LoKr(*(t.get(k) for k in LoKr.KEYS), alpha=alpha)
    else:
        raise ValueError(f"unknown adapter algorithm {algorithm!r}")
    if "dora_scale" in t:
        adapter._set("dora_scale", t["dora_scale"], False)
    return adapter
