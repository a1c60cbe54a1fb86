"""The diffusion loss every method shares: timesteps, noise (with offset), eps/v targets, min-SNR weighting,
prior preservation. A method's `loss` is usually one call to `denoising_loss`.

Randomness comes only from `batch.generator`, which the loop seeds from (seed, step, rank): a resumed run
draws exactly the noise the uninterrupted run would have drawn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def sample_noise(latents: torch.Tensor, generator: torch.Generator | None, offset: float = 0.0) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if offset:
        # Noise offset (Guttenberg 2023): a per-channel constant lets the model learn very dark/bright images.
        noise = noise + offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator,
                                             device=latents.device, dtype=latents.dtype)
    return noise


def sample_timesteps(n: int, scheduler, generator, device) -> torch.Tensor:
    """Uniform over the training timesteps (what every diffusers example does by default)."""
    return torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator, device=device).long()


def cubic_timesteps(n: int, scheduler, generator, device) -> torch.Tensor:
    """Timesteps skewed towards the noisy end, t = (1 - u^3) T: T2I-Adapter's sampling (Mou et al. 2023, 3.4;
    diffusers' train_t2i_adapter_sdxl.py). The structure of an image is decided early, where the noise is high,
    and that is what a condition must steer."""
    steps = scheduler.config.num_train_timesteps
    u = torch.rand((n,), generator=generator, device=device)
    return ((1 - u**3) * steps).long().clamp(0, steps - 1)


@dataclass
class Noised:
    """What the UNet is about to see, for a method whose extra UNet inputs depend on it (a ControlNet runs on
    the same noisy latents, timesteps and text as the UNet)."""

    latents: torch.Tensor  # noisy latents, in the compute dtype
    timesteps: torch.Tensor
    encoder_hidden_states: torch.Tensor  # in the compute dtype
    dtype: torch.dtype
    # SDXL's added conditioning, {"text_embeds", "time_ids"} (None on SD1.x/2.x): a ControlNet takes it too.
    added_cond_kwargs: dict | None = None


def target_for(scheduler, prediction_type: str, latents, noise, timesteps):
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {prediction_type}")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    ac = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return ac / (1 - ac)


def min_snr_weights(scheduler, timesteps, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma)/SNR for eps, min(SNR, gamma)/(SNR+1) for v."""
    s = snr(scheduler, timesteps)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1) if prediction_type == "v_prediction" else clipped / s


def encode_images(vae, pixel_values: torch.Tensor, generator=None, dtype=None) -> torch.Tensor:
    """Pixels in [-1, 1] -> scaled latents (a sample of the posterior, as the diffusers examples do)."""
    dist = vae.encode(pixel_values.to(dtype=dtype or vae.dtype)).latent_dist
    eps = torch.randn(dist.mean.shape, generator=generator, device=dist.mean.device, dtype=dist.mean.dtype)
    latents = dist.mean + dist.std * eps
    return latents * vae.config.scaling_factor


def encode_text(text_encoder, input_ids: torch.Tensor) -> torch.Tensor:
    return text_encoder(input_ids.to(text_encoder.device), return_dict=False)[0]


def added_conditioning(c, batch, latents: torch.Tensor, pooled, dtype) -> dict | None:
    """SDXL's `added_cond_kwargs`: the pooled text embedding and the six micro-conditioning numbers per image
    (the batch's "time_ids", else an uncropped image at the training size). None for SD1.x/2.x."""
    if not c.family.is_xl:
        return None
    if pooled is None:
        raise ValueError("SDXL needs the pooled text embedding: pass pooled_embeds with encoder_hidden_states")
    time_ids = batch.cond.get("time_ids")
    if time_ids is None:
        from .text import default_time_ids

        h, w = latents.shape[-2] * 8, latents.shape[-1] * 8
        time_ids = default_time_ids(latents.shape[0], h, w, latents.device)
    return {"text_embeds": pooled.to(latents.device, dtype), "time_ids": time_ids.to(latents.device, dtype)}


def denoising_loss(c, batch, cfg, *, unet=None, encoder_hidden_states=None, pooled_embeds=None,
                   unet_kwargs: dict | Callable[[Noised], dict] | None = None,
                   timesteps: Callable | None = None) -> torch.Tensor:
    """The standard noise-prediction loss for one batch, as a scalar.

    1. latents (cached, or encoded now), 2. text conditioning (cached, or encoded now), 3. noise + timesteps,
    4. UNet prediction vs. the eps or v target, 5. per-image weights (min-SNR, prior preservation, mask).

    `unet_kwargs`: extra UNet inputs, or a function of the `Noised` inputs that returns them: ControlNet
    residuals (`down_block_additional_residuals`, `mid_block_additional_residual`), T2I-Adapter features
    (`down_intrablock_additional_residuals`), GLIGEN's `cross_attention_kwargs`. `timesteps`: a sampler with
    `sample_timesteps`'s signature (e.g. `cubic_timesteps`); it must draw from the generator it is given.

    SDXL: `pooled_embeds` (or `batch.pooled_embeds`, or the second encoder's when the loss encodes the captions)
    and the batch's micro-conditioning `batch.cond["time_ids"]` (the dataset's original size, crop and target
    size) go to the UNet as `added_cond_kwargs`. A method that passes `encoder_hidden_states` on SDXL passes
    `pooled_embeds` with it (train/text.py's `encode_prompt` gives both).
    """
    gen = batch.generator
    unet = unet or c.unet
    sched = c.extra.get("train_scheduler") or c.scheduler  # the loop sets a DDPM scheduler for training
    # 1. Latents
    latents = batch.latents
    if latents is None:
        with torch.no_grad():
            latents = encode_images(c.vae, batch.pixel_values, gen, dtype=c.dtype)
    latents = latents.float()
    # 2. Text conditioning
    ehs = encoder_hidden_states if encoder_hidden_states is not None else batch.encoder_hidden_states
    pooled = pooled_embeds if encoder_hidden_states is not None else batch.pooled_embeds
    if ehs is None:
        from .text import encode_prompt

        text = encode_prompt(c, batch.input_ids)
        ehs, pooled = text.hidden, text.pooled
    # 3. Noise and timesteps
    noise = sample_noise(latents, gen, cfg.noise_offset)
    t = (timesteps or sample_timesteps)(latents.shape[0], sched, gen, latents.device)
    noisy = sched.add_noise(latents, noise, t)
    # 4. Prediction and target
    pred_type = sched.config.get("prediction_type", "epsilon")
    target = target_for(sched, pred_type, latents, noise, t)
    # c.dtype, not unet.dtype: diffusers' .dtype walks every module (milliseconds per call on a LoRA UNet).
    dtype = c.dtype or unet.dtype
    noisy, ehs = noisy.to(dtype), ehs.to(dtype)
    added = added_conditioning(c, batch, latents, pooled, dtype)
    extra = unet_kwargs(Noised(noisy, t, ehs, dtype, added)) if callable(unet_kwargs) else (unet_kwargs or {})
    if added is not None:
        extra = {"added_cond_kwargs": added, **extra}
    model_pred = unet(noisy, t, ehs, return_dict=False, **extra)[0]
    per_pixel = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    if batch.mask is not None:
        per_pixel = per_pixel * batch.mask
    per_image = per_pixel.mean(dim=(1, 2, 3))
    # 5. Weights
    weights = torch.ones_like(per_image)
    if cfg.min_snr_gamma:
        weights = weights * min_snr_weights(sched, t, cfg.min_snr_gamma, pred_type)
    if batch.is_class is not None and cfg.prior_preservation:
        # Prior preservation (DreamBooth): class images keep the model's idea of the class; their loss counts
        # prior_loss_weight times an instance image's.
        weights = torch.where(batch.is_class.to(weights.device), weights * cfg.prior_loss_weight, weights)
    return (per_image * weights).mean()
