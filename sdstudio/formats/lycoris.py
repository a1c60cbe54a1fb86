"""LyCORIS module layouts: which algorithm a module's tensors are, whether they fit a base layer, and the
runtime adapter they become.

- LoRA / LoCon: lora_down, lora_up (+ lora_mid for a Tucker conv);
- LoHa: hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b (+ hada_t1, hada_t2 for a Tucker conv);
- LoKr: lokr_w1 or lokr_w1_a/_b, lokr_w2 or lokr_w2_a/_b (+ lokr_t2), in any factorisation (LyCORIS' `factor`,
  decompose_both, full_matrix all change the shapes; only kron(w1, w2)'s size must fit);
- DoRA: dora_scale on any of them (peft writes lora_magnitude_vector);
- alpha: the scale is alpha/rank (LoKr with both factors whole: 1).
The same tensors come under kohya names (`lora_unet_..._to_q.hada_w1_a`) or peft names
(`base_model.model.<path>.hada_w1_a`, `unet.<path>.lokr_w1`); formats/lora.py groups them by module.
"""
from __future__ import annotations

import math


def algorithm_of(g: dict) -> str | None:
    """"lora", "loha", "lokr", or None for a group this runtime cannot apply."""
    if "lora_down" in g and "lora_up" in g:
        return "lora"
    if all(k in g for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
        return "loha"
    if ("lokr_w1" in g or "lokr_w1_a" in g) and ("lokr_w2" in g or "lokr_w2_a" in g):
        return "lokr"
    return None


def delta_shape(algorithm: str, g: dict) -> tuple[int, int]:
    """(output channels, number of elements) of the weight change these tensors rebuild."""
    if algorithm == "loha":
        if "hada_t1" in g:  # w_a (r, out), w_b (r, in), t (r, r, k, k)
            out = g["hada_w1_a"].shape[1]
            return int(out), int(out * g["hada_w1_b"].shape[1] * math.prod(g["hada_t1"].shape[2:]))
        out = g["hada_w1_a"].shape[0]
        return int(out), int(out * g["hada_w1_b"][0].numel())
    a, c = g["lokr_w1"].shape if "lokr_w1" in g else (g["lokr_w1_a"].shape[0], g["lokr_w1_b"].shape[1])
    if "lokr_w2" in g:
        w2 = g["lokr_w2"]
        b, rest = w2.shape[0], w2[0].numel()
    elif "lokr_t2" in g:  # w2_a (r, b), w2_b (r, d), t2 (r, r, k, k)
        b = g["lokr_w2_a"].shape[1]
        rest = g["lokr_w2_b"].shape[1] * math.prod(g["lokr_t2"].shape[2:])
    else:  # w2_a (b, r), w2_b (r, d[*k*k])
        b, rest = g["lokr_w2_a"].shape[0], g["lokr_w2_b"][0].numel()
    return int(a * b), int(a * c * b * rest)


def fits(algorithm: str, g: dict, shape: tuple) -> bool:
    """Whether these tensors rebuild a change of the base weight's shape."""
    out, numel = delta_shape(algorithm, g)
    return out == shape[0] and numel == math.prod(shape)


def build(algorithm: str, g: dict, shape: tuple, alpha: float | None):
    """The runtime adapter for one module's tensors."""
    from ..adapters import from_state

    tensors = {k: v.float() for k, v in g.items() if k not in ("alpha", "magnitude")}
    if "magnitude" in g:  # peft's DoRA magnitude: one value per output channel
        tensors["dora_scale"] = g["magnitude"].float().reshape(-1, *([1] * (len(shape) - 1)))
    return from_state(algorithm, tensors, shape, alpha)
