"""Optimizers (AdamW, AdamW8bit, Prodigy, Adafactor, Lion) and learning-rate schedules with warmup."""
from __future__ import annotations

from ..errors import UserError


def build_optimizer(name: str, groups, cfg, device: str):
    """One optimizer over the method's ParamGroups, each at its own learning rate."""
    import torch

    wd = cfg.weight_decay
    params = [{"params": g.params, "lr": g.lr, "weight_decay": wd if g.weight_decay is None else g.weight_decay,
               "name": g.name} for g in groups if g.params]
    if not params:
        raise UserError("This method has nothing to train with these settings: turn on at least one part.")
    lr = params[0]["lr"]
    if name == "adamw":
        # One fused kernel over every tensor (CPU and CUDA) instead of a Python loop over hundreds of small
        # LoRA tensors: same maths, a fraction of the launch overhead. Trainable weights are fp32 (the loop
        # makes them so), which the fused kernel needs.
        fused = cfg.fused_optimizer and str(device).split(":")[0] in ("cpu", "cuda") and all(
            p.dtype == torch.float32 for g in params for p in g["params"])
        return torch.optim.AdamW(params, lr=lr, fused=fused or None, foreach=None if fused else True)
    if name == "adamw8bit":
        if not str(device).startswith("cuda"):
            raise UserError("adamw8bit needs a CUDA GPU: use optimizer = \"adamw\" on this machine.")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("adamw8bit needs bitsandbytes: pip install bitsandbytes (or pip install "
                            "'sdstudio[cuda]'), or use optimizer = \"adamw\".") from None
        return bnb.optim.AdamW8bit(params, lr=lr)
    if name == "prodigy":
        from prodigyopt import Prodigy

        # Prodigy finds its own step size; lr is a multiplier (1.0 is the recommended value).
        return Prodigy(params, lr=lr, safeguard_warmup=cfg.warmup_steps > 0, use_bias_correction=True)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(params, lr=lr)
    raise UserError(f"Unknown optimizer {name!r}: use adamw, adamw8bit, prodigy, adafactor or lion.")


def build_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
