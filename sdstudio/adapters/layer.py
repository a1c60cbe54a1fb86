"""AdapterLayer: a base Linear or Conv2d with named adapters on top, and the forward that applies them.

One class serves training (one trainable adapter) and the Playground (any number of loaded adapters, each at
its own weight). `plan()` decides, once per change, how a call runs:
- nothing active: the base op;
- training (autograd on): base(x) + s up(down(dropout(x))) for a LoRA (three ops, peft's maths), and the
  base op on W + s dW for LoHa, LoKr and DoRA, whose deltas only exist as whole weights;
- inference: plain LoRAs run the cheaper exact way per call, either as low-rank branches, two or more of them
  concatenated into one pair (one A and one B matmul instead of two per LoRA), or merged, W + sum s B@A, in
  the base op (on the UNet's spatial layers, thousands of tokens, merging is several times cheaper; on the
  text encoder's 77 tokens the branch is). Other adapters are always merged. With a `MergedWeights` budget
  that has room, the merged weight is kept from the first call until the plan changes, so a stack that
  stays put costs what the base costs.
The base weight is never written here, so weight changes, step ranges and unfusing stay instant and exact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .merged import MergedWeights
from .modules import Adapter, LoRA


class AdapterLayer(nn.Module):
    """`base_layer` (Linear or Conv2d, frozen) plus `adapters` by name; `scales` holds each adapter's
    multiplier (its weight in the Playground, 1 in training) and `active` the names applied, in order."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"adapters attach to Linear and Conv2d layers, not {type(base).__name__}")
        self.base_layer = base
        self.adapters = nn.ModuleDict()
        self.scales: dict[str, float] = {}
        self.active: list[str] = []
        self._run = None  # the planned forward
        self._plan_key = None
        self._mix_key = None  # (names, versions) of the concatenated pair
        self._mix = None  # (A, B, [(slice of B, that LoRA)]) for two or more plain LoRAs
        self._mix_scales = None

    # What code written for the plain layer reads.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base_layer, nn.Conv2d)

    # 1. Adapters --------------------------------------------------------------------------------------------
    def add(self, name: str, adapter: Adapter, scale: float = 1.0, active: bool = True) -> None:
        if name in self.adapters:
            raise ValueError(f"{name!r} is already on this layer")
        self.adapters[name] = adapter
        self.scales[name] = float(scale)
        if active:
            self.active = [*self.active, name]
        self._plan_key = self._run = None

    def remove(self, name: str) -> None:
        if name in self.adapters:
            del self.adapters[name]
        self.scales.pop(name, None)
        self.active = [n for n in self.active if n != name]
        self._mix_key = self._mix = self._mix_scales = None
        self._plan_key = None
        self._run = None

    def delta_weight(self, name: str) -> torch.Tensor:
        """What adapter `name` adds to the base weight at its current scale (DoRA's renormalisation in)."""
        w = self.base_layer.weight
        return self.adapters[name].delta(w) * self.scales.get(name, 1.0)

    # 2. The base op and the branches -------------------------------------------------------------------------
    def _op(self, x: torch.Tensor, w: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        base = self.base_layer
        bias = base.bias if with_bias else None
        if isinstance(base, nn.Conv2d):
            return base._conv_forward(x, w, bias)
        return F.linear(x, w, bias)

    def _mix_pair(self, names: list[str]):
        """Two or more plain LoRAs as one pair: A = [A_1; A_2; ...], B = [s_1 B_1, s_2 B_2, ...], so that
        B A x = sum_i s_i B_i A_i x. A is rebuilt when the set of LoRAs changes; B's slices on a weight change."""
        loras = [self.adapters[n] for n in names]
        key = (tuple(names), tuple((a.lora_down._version, a.lora_up._version) for a in loras))
        if self._mix_key != key:
            mix_a = torch.cat([a.lora_down.detach() for a in loras], 0)
            up0 = loras[0].lora_up
            mix_b = torch.empty((up0.shape[0], mix_a.shape[0], *up0.shape[2:]), dtype=up0.dtype, device=up0.device)
            slices, start = [], 0
            for a in loras:
                r = a.lora_up.shape[1]
                slices.append((mix_b[:, start:start + r], a))
                start += r
            self._mix, self._mix_key, self._mix_scales = (mix_a, mix_b, slices), key, None
        scales = tuple(self.scales[n] * self.adapters[n].scale for n in names)
        if self._mix_scales != scales:  # unchanged: B stays, and so does this layer's plan and kept weight
            with torch.no_grad():
                for (dst, a), s in zip(self._mix[2], scales):
                    torch.mul(a.lora_up.detach(), s, out=dst)
            self._mix_scales = scales
        return self._mix[0], self._mix[1]

    # 3. The plan ---------------------------------------------------------------------------------------------
    def plan(self, cache: MergedWeights | None = None) -> None:
        """(Re)plan how calls run for the active adapters at their current scales. A layer whose adapters,
        scales and base weight are unchanged keeps its plan (and its kept merged weight)."""
        base = self.base_layer
        names = [n for n in self.active if n in self.adapters and self.scales.get(n, 0.0) != 0.0]
        plain = [n for n in names if isinstance(self.adapters[n], LoRA) and self.adapters[n].plain]
        others = [n for n in names if n not in plain]
        mix = self._mix_pair(plain) if len(plain) >= 2 else None
        w = base.weight
        key = (tuple(names), tuple(self.scales[n] for n in names), self._mix_key if mix else None,
               self._mix_scales if mix else None, id(w), w._version)
        if self._plan_key == key and self._run is not None:
            return
        self._plan_key = key
        if cache is not None:
            cache.release(self)
        if not names:  # nothing active here (fused, or every weight 0): the base op alone
            self._run = base.forward  # (a bound method: a module here would register as a child)
            return
        out_f = w.shape[0]
        in_k = w[0].numel()  # in features x kernel area
        # The low-rank pairs (down, up, scale, dropout) the inference path runs or merges.
        if mix is not None:
            pairs = [(mix[0], mix[1], 1.0, None)]
        else:
            pairs = [(self.adapters[n].lora_down, self.adapters[n].lora_up, self.scales[n] * self.adapters[n].scale,
                      self.adapters[n]) for n in plain]
        rank = sum(p[0].shape[0] for p in pairs)
        # Merge when tokens x rank x (in k + out) > out x in k x (rank + 1): the branch's cost against B@A and
        # the add (with other adapters present the weight is merged anyway).
        min_tokens = 0 if others or not rank else out_f * in_k * (rank + 1) / (rank * (in_k + out_f))
        in_features = w.shape[1]
        # The adapters' parameters, listed once here: a list filled at the first call would change what a compiled
        # UNet's guards saw and make torch.compile trace the whole UNet again.
        tensors = [p for n in names for p in self.adapters[n].parameters()]

        def training() -> bool:
            """Autograd on and an adapter here trains (asked per call: pivotal tuning freezes its LoRA by phase)."""
            return torch.is_grad_enabled() and any(p.requires_grad for p in tensors)

        def merged_weight(cast: bool = True) -> torch.Tensor:
            w = base.weight
            if others:
                d = sum(self.delta_weight(n) for n in others)
                w = (w + d).to(w.dtype) if cast else w + d
            if not pairs:
                return w
            flat = w.reshape(out_f, -1)
            for down, up, s, _a in pairs:
                flat = torch.addmm(flat, up.reshape(out_f, -1).to(flat.dtype), down.reshape(down.shape[0], -1)
                                   .to(flat.dtype), alpha=s)
            return flat.reshape(w.shape)

        held = cache.slot(self, base) if cache is not None else None

        def kept():
            """The cached merged weight, made at the first call with room in the budget; None to merge per call."""
            if held is None or torch.is_grad_enabled():  # training or autograd tests: never hand out a kept tensor
                return None
            got = held.get()
            if got is None and held.reserve():
                with torch.no_grad():
                    got = held.keep(merged_weight())
            return got

        def run(x: torch.Tensor) -> torch.Tensor:
            if training():
                # Training: LoRAs as branches (dropout included), everything else merged, all differentiable.
                y = self._op(x, merged_weight(cast=False) if others else base.weight)
                for n in plain:
                    a = self.adapters[n]
                    y = torch.add(y, a.branch(x, base).to(y.dtype), alpha=self.scales[n] * a.scale)
                return y
            m = kept()
            if m is None and (others or x.numel() // in_features > min_tokens):
                m = merged_weight()
            if m is not None:
                return self._op(x, m)
            y = self._op(x, base.weight)
            for down, up, s, a in pairs:
                h = a.branch(x, base) if a is not None else self._branch(x, down, up)
                y = torch.add(y, h.to(y.dtype), alpha=s)
            return y

        self._run = run

    def _branch(self, x, down, up):
        base = self.base_layer
        x = x.to(down.dtype)
        if down.ndim == 2:
            return F.linear(F.linear(x, down), up)
        return F.conv2d(F.conv2d(x, down, None, base.stride, base.padding, base.dilation), up)

    # 4. The forward ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        run = self._run
        if run is None:
            self.plan()
            run = self._run
        if not args and not kwargs:
            return run(x)
        # Extra arguments (none of diffusers' or transformers' layers pass any today): the base module with
        # them, plus each active adapter's change as its own op.
        y = self.base_layer(x, *args, **kwargs)
        for n in self.active:
            if n in self.adapters and self.scales.get(n, 0.0):
                y = y + self._op(x, self.delta_weight(n).to(y.dtype), with_bias=False)
        return y

    def extra_repr(self) -> str:
        return f"active={self.active}"
