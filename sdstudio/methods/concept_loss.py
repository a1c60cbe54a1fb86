"""The denoising loss the concept methods share: noise a latent, predict, compare (optionally under a mask)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def train_scheduler(c):
    """A DDPM scheduler with the base's noise schedule and prediction type (what the base was trained with)."""
    from diffusers import DDPMScheduler

    sched = c.extra.get("_train_scheduler")
    if sched is None:
        sched = DDPMScheduler.from_config(c.scheduler.config)
        c.extra["_train_scheduler"] = sched
    return sched


def latents_of(c, batch) -> torch.Tensor:
    if batch.latents is not None:
        return batch.latents
    with torch.no_grad():
        px = batch.pixel_values.to(c.vae.device, c.vae.dtype)
        return c.vae.encode(px).latent_dist.sample() * c.vae.config.scaling_factor


def denoise_loss(c, batch, cond: torch.Tensor, noise_offset: float = 0.0, use_mask: bool = False) -> torch.Tensor:
    """MSE between the UNet's prediction and its target (eps or v), averaged inside the mask when asked."""
    sched = train_scheduler(c)
    latents = latents_of(c, batch).to(c.unet.dtype)
    noise = torch.randn_like(latents)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device,
                                                   dtype=latents.dtype)
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
    noisy = sched.add_noise(latents, noise, t)
    pred = c.unet(noisy, t, cond.to(c.unet.dtype)).sample
    target = sched.get_velocity(latents, noise, t) if sched.config.prediction_type == "v_prediction" else noise
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    if use_mask and batch.mask is not None:
        mask = F.interpolate(batch.mask.float(), size=err.shape[-2:], mode="nearest").expand_as(err)
        return ((err * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3)).clamp(min=1.0)).mean()
    return err.mean()
