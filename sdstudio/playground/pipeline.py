"""Our SD pipeline: one denoising pass with any number of ControlNets and T2I-Adapters together, GLIGEN boxes,
regions, per-item step ranges, LoRA step ranges, txt2img / img2img / inpaint, CFG, clip skip, A1111 prompt
weighting, and a seed per image so a batch is reproducible image by image.

diffusers has no SD1.x pipeline that runs ControlNet and T2I-Adapter in one pass, and its multi-ControlNet
silently drops extra nets when list lengths differ; here lengths and scales are checked first.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Sequence

from ..errors import UserError
from . import prompt as prompt_mod
from .recipe import Recipe

# Sampler names (A1111/ComfyUI style) -> diffusers scheduler class and settings.
SAMPLERS: dict[str, tuple[str, dict]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpm++2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++2m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                           "use_karras_sigmas": True}),
    "dpm++2s_a": ("DPMSolverSinglestepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
}

# A cheap latent -> RGB map for live previews (no VAE decode), fitted for SD1.x/2.x latents.
_PREVIEW_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))


def make_scheduler(name: str, base_config):
    import diffusers

    key = name.strip().lower().replace(" ", "_")
    if key not in SAMPLERS:
        raise UserError(f"Unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}.")
    cls_name, extra = SAMPLERS[key]
    cls = getattr(diffusers, cls_name)
    config = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    config.pop("skip_prk_steps", None) if cls_name != "PNDMScheduler" else None
    config.update(extra)
    return cls.from_config(config)


def latents_to_rgb(latents):
    """[B, 4, h, w] latents -> list of small PIL previews."""
    import torch
    from PIL import Image

    m = torch.tensor(_PREVIEW_RGB, dtype=torch.float32)
    rgb = torch.einsum("bchw,cr->brhw", latents.detach().float().cpu(), m)
    rgb = ((rgb + 1) / 2).clamp(0, 1).mul(255).byte().permute(0, 2, 3, 1).numpy()
    # Latents are 1/8 of the image: show them at least 256 px wide so the preview is readable.
    out = []
    for x in rgb:
        im = Image.fromarray(x)
        scale = max(1, 256 // max(im.size))
        out.append(im.resize((im.width * max(scale, 8), im.height * max(scale, 8)), Image.Resampling.BILINEAR))
    return out


def to_pil(images):
    from PIL import Image

    arr = ((images.detach().float().cpu() / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def _check_lists(kind: str, models: Sequence, images: Sequence, weights, ranges) -> tuple[list, list]:
    n = len(models)
    if len(images) != n:
        raise UserError(f"{n} {kind}(s) but {len(images)} control image(s): give each {kind} exactly one image.")
    weights = [1.0] * n if weights is None else list(weights)
    ranges = [(0.0, 1.0)] * n if ranges is None else list(ranges)
    if len(weights) != n:
        raise UserError(f"{n} {kind}(s) but {len(weights)} weight(s): give each {kind} exactly one weight.")
    if len(ranges) != n:
        raise UserError(f"{n} {kind}(s) but {len(ranges)} step range(s): give each {kind} one start/end pair.")
    for w in weights:
        if not (isinstance(w, (int, float)) and math.isfinite(w) and -10 <= w <= 10):
            raise UserError(f"A {kind} weight of {w!r} is out of range: use a number between -10 and 10.")
    for s, e in ranges:
        if not 0 <= s < e <= 1:
            raise UserError(f"A {kind} step range {s}-{e} is invalid: use 0 <= start < end <= 1.")
    return weights, ranges


def _active(i: int, n: int, start: float, end: float) -> bool:
    # The same rule as diffusers' control_guidance_start/end.
    return i / n >= start and (i + 1) / n <= end + 1e-9


def _image_tensor(img, width: int, height: int, device, dtype, what: str):
    """A PIL image (or a [1,3,H,W] tensor in 0..1) checked for size, as a [1,3,H,W] tensor in 0..1."""
    import numpy as np
    import torch

    if isinstance(img, torch.Tensor):
        t = img
    else:
        t = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    if tuple(t.shape[-2:]) != (height, width):
        raise UserError(f"The {what} is {t.shape[-1]}x{t.shape[-2]} but the output is {width}x{height}: resize it "
                        f"or change width/height to match.")
    return t.to(device=device, dtype=dtype)


def generate(comps, recipe: Recipe, *, stack=None,
             controlnets: Sequence = (), control_images: Sequence = (), control_weights=None, control_ranges=None,
             adapters: Sequence = (), adapter_images: Sequence = (), adapter_weights=None, adapter_ranges=None,
             init_image=None, mask=None, on_step: Callable | None = None, check: Callable | None = None):
    """Run one denoising pass for `recipe` on `comps` and return PIL images (one per seed).

    Control images are PIL images (or tensors) already at width x height. `on_step(i, total, latents)` is
    called after every step (live previews); `check()` may raise to stop (a Job's Stop)."""
    import torch

    # 1. Check the inputs before doing any work
    recipe.validate()
    cn_w, cn_r = _check_lists("ControlNet", controlnets, control_images, control_weights, control_ranges)
    ad_w, ad_r = _check_lists("T2I-Adapter", adapters, adapter_images, adapter_weights, adapter_ranges)
    W, H, B = recipe.width, recipe.height, recipe.batch
    if adapters and (W % 64 or H % 64):
        raise UserError(f"With a T2I-Adapter, width and height must be multiples of 64 (got {W}x{H}).")
    unet, vae = comps.unet, comps.vae
    device, dtype = unet.device, unet.dtype
    if mask is not None and init_image is None:
        raise UserError("An inpaint mask needs an init image to paint into.")

    with torch.inference_mode():
        # 2. Prompts (A1111 weighting, long prompts, embeddings, clip skip)
        use_cfg = recipe.cfg > 1.0
        added = None
        if comps.family.is_xl:
            toks, tes = comps.tokenizers, comps.text_encoders
            pos = [stack.expand_prompt(recipe.prompt, i) if stack else recipe.prompt for i in range(len(tes))]
            neg = [stack.expand_prompt(recipe.negative_prompt, i) if stack else recipe.negative_prompt
                   for i in range(len(tes))]
            n = max(prompt_mod.chunk_count(t, tok) for t, tok in zip(pos + neg, toks + toks))
            cond, pooled = prompt_mod.encode_xl(pos, toks, tes, recipe.clip_skip, n)
            rows_pooled = pooled.expand(B, -1)
            if use_cfg:
                uncond, upooled = prompt_mod.encode_xl(neg, toks, tes, recipe.clip_skip, n,
                                                       zero=not recipe.negative_prompt.strip())
                rows_pooled = torch.cat([upooled.expand(B, -1), rows_pooled])
            cond, rows_pooled = cond.to(dtype), rows_pooled.to(dtype)
            uncond = uncond.to(dtype) if use_cfg else None
            time_ids = torch.tensor([[H, W, 0, 0, H, W]], device=device, dtype=dtype).expand(rows_pooled.shape[0], -1)
            added = {"text_embeds": rows_pooled, "time_ids": time_ids}
        else:
            tok, te = comps.tokenizer, comps.text_encoder
            pos = stack.expand_prompt(recipe.prompt) if stack else recipe.prompt
            neg = stack.expand_prompt(recipe.negative_prompt) if stack else recipe.negative_prompt
            n = max(prompt_mod.chunk_count(pos, tok), prompt_mod.chunk_count(neg, tok))
            cond = prompt_mod.encode(pos, tok, te, recipe.clip_skip, n).to(dtype)
            uncond = prompt_mod.encode(neg, tok, te, recipe.clip_skip, n).to(dtype) if use_cfg else None
        emb = torch.cat([uncond.expand(B, -1, -1), cond.expand(B, -1, -1)]) if use_cfg else cond.expand(B, -1, -1)
        # 2b. [[region]] prompts and EDLoRA tokens: per-box and per-layer conditioning (playground/regions.py)
        from .regions import recipe_attention

        encs = list(zip(comps.tokenizers, comps.text_encoders))
        expand = (lambda p, i=0: stack.expand_prompt(p, i)) if stack else (lambda p, i=0: p)

        def encode_one(p, k):  # the same encoder as above, for a region's or a layer's prompt
            if comps.family.is_xl:  # an empty (negative) prompt is zeros, as above
                return prompt_mod.encode_xl([expand(p, i) for i in range(len(encs))], *zip(*encs), recipe.clip_skip,
                                            k, zero=not p.strip())[0].to(dtype)
            return prompt_mod.encode(expand(p), *encs[0], recipe.clip_skip, k).to(dtype)

        attn = recipe_attention(comps, recipe, encode_one, lambda p: max(prompt_mod.chunk_count(expand(p, i), t)
                                                                         for i, (t, _) in enumerate(encs)),
                                emb, B, use_cfg, ad_w)
        emb = attn.emb
        rows = emb.shape[0]
        # 2c. [[grounding]] phrases in boxes: the GLIGEN objects for the gated layers (playground/gligen.py)
        from .gligen import recipe_grounding

        grounding = recipe_grounding(comps, recipe, expand, B, use_cfg)
        extra = {"added_cond_kwargs": added} if added is not None else {}

        # 3. Scheduler and timesteps
        sched = make_scheduler(recipe.sampler, comps.scheduler.config)
        sched.set_timesteps(recipe.steps, device=device)
        timesteps = sched.timesteps
        start_index = 0
        if init_image is not None:
            keep = min(max(int(round(recipe.steps * recipe.strength)), 1), recipe.steps)
            start_index = (recipe.steps - keep) * sched.order
            timesteps = timesteps[start_index:]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(start_index)

        # 4. Noise: one generator per image, seeded seed + i, drawn on the CPU so it is the same on every device
        h, w = H // 8, W // 8
        gens = [torch.Generator("cpu").manual_seed(recipe.seed + i) for i in range(B)]
        noise = torch.cat([torch.randn((1, unet.config.in_channels if unet.config.in_channels == 4 else 4, h, w),
                                       generator=g) for g in gens]).to(device=device, dtype=dtype)
        sf = vae.config.scaling_factor
        init_latents = mask_lat = masked_lat = None
        if init_image is not None:
            img = _image_tensor(init_image, W, H, device, dtype, "init image")
            init_latents = (vae.encode(img * 2 - 1).latent_dist.mean * sf).expand(B, -1, -1, -1)
            latents = sched.add_noise(init_latents, noise, timesteps[:1].repeat(B))
            if mask is not None:
                m = _image_tensor(mask, W, H, device, dtype, "mask")[:, :1]
                m = (m > 0.5).to(dtype)
                mask_lat = torch.nn.functional.interpolate(m, size=(h, w), mode="nearest").expand(B, -1, -1, -1)
                if unet.config.in_channels == 9:
                    masked_lat = (vae.encode((img * (1 - m)) * 2 - 1).latent_dist.mean * sf).expand(B, -1, -1, -1)
        else:
            latents = noise * sched.init_noise_sigma
        if unet.config.in_channels == 9 and masked_lat is None:
            raise UserError("This is an inpainting model: give it an init image and a mask.")

        # 5. Control inputs: ControlNet images per step, T2I-Adapter features once (they do not depend on t)
        cn_imgs = [_image_tensor(im, W, H, device, dtype, f"control image for ControlNet {k + 1}")
                   .expand(rows, -1, -1, -1) for k, im in enumerate(control_images)]
        ad_feats = []
        for k, (ad, im) in enumerate(zip(adapters, adapter_images)):
            t = _image_tensor(im, W, H, device, dtype, f"control image for T2I-Adapter {k + 1}")
            if ad.config.in_channels == 1:
                t = t.mean(dim=1, keepdim=True)
            ad_feats.append([f.expand(rows, -1, -1, -1) for f in attn.adapter_features(k, ad(t))]
                            if ad_w[k] != 0 else None)

        step_kwargs = {"generator": gens} if "generator" in inspect.signature(sched.step).parameters else {}
        total = len(timesteps)
        if stack is not None:
            stack.reset_steps()
        # 6. Denoising loop
        try:
            attn.install()
            for i, t in enumerate(timesteps):
                if check:
                    check()
                if stack is not None:
                    stack.on_step(i, total)
                x = torch.cat([latents] * 2) if use_cfg else latents
                x = sched.scale_model_input(x, t)
                if masked_lat is not None:
                    x = torch.cat([x, torch.cat([mask_lat] * (rows // B)), torch.cat([masked_lat] * (rows // B))], 1)
                kwargs = {}
                # 6a. ControlNets: residuals of every net in range, weighted and summed
                down_res = mid_res = None
                for k, net in enumerate(controlnets):
                    if cn_w[k] == 0 or not _active(i, total, *cn_r[k]):
                        continue
                    d, m_ = net(x[:, :4] if x.shape[1] != net.config.in_channels else x, t, encoder_hidden_states=emb,
                                controlnet_cond=cn_imgs[k], conditioning_scale=float(cn_w[k]), return_dict=False,
                                **extra)
                    if down_res is None:
                        down_res, mid_res = list(d), m_
                    else:
                        down_res = [a + b for a, b in zip(down_res, d)]
                        mid_res = mid_res + m_
                if down_res is not None:
                    kwargs.update(down_block_additional_residuals=down_res, mid_block_additional_residual=mid_res)
                # 6b. T2I-Adapters: weighted sum of features; a fresh list every step (the UNet pops from it)
                intrablock = None
                for k, feats in enumerate(ad_feats):
                    if feats is None or not _active(i, total, *ad_r[k]):
                        continue
                    scaled = [f * float(ad_w[k]) for f in feats]
                    intrablock = scaled if intrablock is None else [a + b for a, b in zip(intrablock, scaled)]
                if intrablock is not None:
                    kwargs["down_intrablock_additional_residuals"] = [r.clone() for r in intrablock]
                # 6c. GLIGEN: the objects while grounding is on (scheduled sampling), then the plain base
                kwargs.update(grounding.unet_kwargs(i, total))
                noise_pred = unet(x, t, encoder_hidden_states=emb, return_dict=False, **kwargs, **extra)[0]
                # 6d. Classifier-free guidance and the scheduler step
                if use_cfg:
                    nu, nc = noise_pred.chunk(2)
                    noise_pred = nu + recipe.cfg * (nc - nu)
                latents = sched.step(noise_pred, t, latents, return_dict=False, **step_kwargs)[0]
                # 6e. Inpainting on a regular model: keep the unmasked area on the original's noise trajectory
                if mask_lat is not None and masked_lat is None:
                    if i < total - 1:
                        orig = sched.add_noise(init_latents, noise, timesteps[i + 1:i + 2].repeat(B))
                    else:
                        orig = init_latents
                    latents = orig * (1 - mask_lat) + latents * mask_lat
                if on_step:
                    on_step(i, total, latents)
        finally:
            attn.close()
            if stack is not None:
                stack.reset_steps()

        # 7. Decode (SDXL's VAE overflows in fp16: it asks to be upcast, as diffusers does)
        upcast = vae.config.get("force_upcast", False) and vae.dtype == torch.float16
        if upcast:
            vae.to(torch.float32)
        try:
            images = vae.decode((latents / sf).to(vae.dtype), return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype)
    return to_pil(images)
