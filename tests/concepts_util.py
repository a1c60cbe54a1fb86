"""Helpers for the concept-method tests: a few real optimizer steps on the tiny model, and fixed-seed sampling."""
from __future__ import annotations

import torch

from sdstudio.methods.base import Batch

# The tiny model's ops are so small that a second thread only adds contention (measured here: one UNet call
# 33 ms on 1 thread vs 256 ms on 2 threads of a busy 2-core machine).
torch.set_num_threads(1)


def fake_batch(n: int = 2, size: int = 64, seed: int = 0, captions=None, mask: bool = False) -> Batch:
    """Random 'photos' (the tiny model has random weights; what matters is that the code path is real)."""
    g = torch.Generator().manual_seed(seed)
    px = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    m = None
    if mask:
        m = torch.zeros(n, 1, size // 8, size // 8)
        m[..., 2:6, 2:6] = 1
    return Batch(captions=list(captions or ["a photo"] * n), pixel_values=px, cond={"mask": m} if mask else {})


def train_steps(method, c, cfg, steps: int = 3, batch=None, lr_scale: float = 1.0):
    """Run `steps` AdamW steps of `method` (what the loop does, without its bookkeeping)."""
    torch.manual_seed(0)
    groups = method.prepare(c, cfg)
    opt = torch.optim.AdamW([{"params": g.params, "lr": g.lr * lr_scale,
                              "weight_decay": 0.0 if g.weight_decay is None else g.weight_decay} for g in groups])
    losses = []
    for step in range(steps):
        loss = method.loss(c, batch or fake_batch(seed=step), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return groups, losses


def sample_np(pipe, prompt: str, seed: int = 7, steps: int = 3, **kw):
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=kw.pop("guidance_scale", 5.0), height=64,
                width=64, generator=g, output_type="np", **kw).images[0]
