"""Regionally controllable sampling (Mix-of-Show): boxes with their own prompts on top of a global prompt.

In every cross-attention layer, image positions inside a box attend to that box's prompt instead of the global
one; where boxes overlap their results are averaged; outside all boxes the global prompt rules. Because each
cross-attention output is an affine map of the attention result with weights summing to one, averaging after
`to_out` equals Mix-of-Show's averaging before it. Per-region T2I-Adapter weights scale the adapter's feature
maps inside each box. EDLoRA tokens work in every prompt (layer-wise conditioning, concepts/layerwise.py).

EDLoRA previews (methods/) and the Playground (playground/regions.py) both sample through here.

Boxes here are fractions of the image: (left, top, right, bottom), each in [0, 1] (the Playground converts a
recipe's other box formats first, playground/regions.py). Box strings are parsed as plain numbers, never evaluated.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import torch

from ..errors import UserError
from .layerwise import (AttnContext, LayerwiseAttnProcessor, concept_table, cross_attention_layers,
                        encode_layerwise, install_processors)

_NUM = re.compile(r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$")


def parse_box(value) -> tuple[float, float, float, float]:
    """'0.1, 0.2, 0.6, 1.0' / '[0.1 0.2 0.6 1]' / a list of 4 numbers -> (left, top, right, bottom) fractions."""
    if isinstance(value, str):
        parts = [p for p in re.split(r"[\s,;]+", value.strip().strip("[]()")) if p]
        if len(parts) != 4 or not all(_NUM.match(p) for p in parts):
            raise UserError(f"Region box {value!r} is not four numbers: write it as 'left, top, right, bottom' "
                            "fractions, e.g. '0, 0, 0.5, 1'.")
        nums = [float(p) for p in parts]
    else:
        try:
            nums = [float(v) for v in value]
        except (TypeError, ValueError):
            nums = []
        if len(nums) != 4:
            raise UserError(f"Region box {value!r} is not four numbers: give [left, top, right, bottom] fractions.")
    x0, y0, x1, y1 = nums
    if not all(0.0 <= v <= 1.0 for v in nums) or not (x0 < x1 and y0 < y1):
        raise UserError(f"Region box {value!r} must hold fractions in 0..1 with left < right and top < bottom.")
    return x0, y0, x1, y1


@dataclass
class Region:
    prompt: str
    box: tuple[float, float, float, float]  # (left, top, right, bottom) fractions
    negative_prompt: str | None = None  # None: the global negative prompt
    t2i_weight: float | None = None  # None: the adapter's global weight inside this box too

    def __post_init__(self):
        self.box = parse_box(self.box)
        if not self.prompt.strip():
            raise UserError("A region has an empty prompt: write what belongs in that box.")

    def mask(self, h: int, w: int, device=None) -> torch.Tensor:
        """(h, w) bool: the feature cells inside the box (Mix-of-Show rounds inward: ceil start, floor end)."""
        x0, y0, x1, y1 = self.box
        m = torch.zeros(h, w, dtype=torch.bool, device=device)
        m[math.ceil(y0 * h):math.floor(y1 * h), math.ceil(x0 * w):math.floor(x1 * w)] = True
        return m


def feature_size(size: tuple[int, int], seq: int) -> tuple[int, int]:
    """The (h, w) of a UNet level with `seq` positions, from the latent size (stride-2 convs round up)."""
    h, w = size
    while h * w > seq and h > 0:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != seq:
        raise RuntimeError(f"cannot place {seq} positions on a {size} latent")
    return h, w


class RegionAttnProcessor(LayerwiseAttnProcessor):
    """Layer-wise cross-attention (EDLoRA) + region prompts from the shared AttnContext."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        ctx = self.ctx
        if encoder_hidden_states is None or ctx is None or not ctx.regions or hidden_states.ndim != 3:
            return out
        h, w = feature_size(ctx.size, hidden_states.shape[1])
        acc = torch.zeros_like(out)
        count = torch.zeros(h * w, device=out.device, dtype=out.dtype)
        for region, states in ctx.regions:
            m = region.mask(h, w, out.device).flatten()
            if not bool(m.any()):
                continue  # the box is smaller than one cell at this resolution
            n = out.shape[0] // states.shape[0]
            st = states.repeat_interleave(n, 0) if n > 1 else states
            st = st[:, self.index] if st.ndim == 4 else st
            r = self.inner(attn, hidden_states, st.to(out.device, out.dtype), None, temb)
            acc += r * m.view(1, -1, 1).to(out.dtype)
            count += m.to(out.dtype)
        inside = (count > 0).view(1, -1, 1)
        return torch.where(inside, acc / count.clamp(min=1).view(1, -1, 1), out)


@contextlib.contextmanager
def region_adapter_weights(adapter, regions: list[Region], weight: float = 1.0):
    """Scale a T2I-Adapter's feature maps: `weight` everywhere, a region's `t2i_weight` inside its box."""
    if adapter is None or not any(r.t2i_weight is not None for r in regions):
        yield
        return

    def hook(module, inputs, outputs):
        scaled = []
        for f in outputs:
            h, w = f.shape[-2:]
            wmap = torch.full((h, w), float(weight), device=f.device, dtype=f.dtype)
            for r in regions:
                if r.t2i_weight is not None:
                    wmap[r.mask(h, w, f.device)] = float(r.t2i_weight)
            scaled.append(f * wmap)
        return type(outputs)(scaled) if isinstance(outputs, (list, tuple)) else scaled

    handle = adapter.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def build_context(c, prompt: str, negative_prompt: str, regions: list[Region], guidance: float, height: int,
                  width: int, clip_skip: int = 1) -> tuple[AttnContext, torch.Tensor, torch.Tensor]:
    """Encode every prompt (layer-wise, so EDLoRA tokens work) and fill the context the processors read."""
    table = concept_table(c)
    layers = len(cross_attention_layers(c.unet))
    enc = lambda p: encode_layerwise(c, [p], table, layers, clip_skip)  # noqa: E731
    pos, neg = enc(prompt), enc(negative_prompt or "")
    cfg_on = guidance > 1.0
    ctx = AttnContext()
    ctx.size = (math.ceil(height / 8), math.ceil(width / 8))
    ctx.layer_states = torch.cat([neg, pos]) if cfg_on else pos
    for r in regions:
        rpos = enc(r.prompt)
        rneg = enc(r.negative_prompt if r.negative_prompt is not None else (negative_prompt or ""))
        ctx.regions.append((r, torch.cat([rneg, rpos]) if cfg_on else rpos))
    return ctx, pos, neg


@contextlib.contextmanager
def attention_context(c, ctx: AttnContext):
    """Install the region/layer-wise processors for one generation and restore the previous ones after."""
    before = install_processors(c.unet, ctx, RegionAttnProcessor)
    try:
        yield ctx
    finally:
        c.unet.set_attn_processor(before)


@torch.no_grad()
def generate(c, prompt: str, negative_prompt: str = "", regions: list[Region] | None = None, *, steps: int = 20,
             guidance: float = 7.0, seed: int = 0, height: int = 512, width: int = 512, scheduler=None,
             clip_skip: int = 1, adapter=None, adapter_image=None, adapter_weight: float = 1.0,
             output_type: str = "pil", callback=None, generator=None):
    """One image from a global prompt plus regions (and EDLoRA concepts loaded with apply_edlora)."""
    regions = list(regions or [])
    ctx, pos, neg = build_context(c, prompt, negative_prompt, regions, guidance, height, width, clip_skip)
    gen = generator or torch.Generator(device="cpu").manual_seed(int(seed))
    kw = dict(prompt_embeds=pos[:, 0], negative_prompt_embeds=neg[:, 0], num_inference_steps=steps,
              guidance_scale=guidance, height=height, width=width, generator=gen, output_type=output_type)
    if callback is not None:
        kw["callback_on_step_end"] = callback
    if adapter is not None:
        from diffusers import StableDiffusionAdapterPipeline

        pipe = StableDiffusionAdapterPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                                              unet=c.unet, adapter=adapter, scheduler=scheduler or c.scheduler,
                                              safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        kw.update(image=adapter_image, adapter_conditioning_scale=1.0)
        with attention_context(c, ctx), region_adapter_weights(adapter, regions or [], adapter_weight):
            if not any(r.t2i_weight is not None for r in regions):
                kw["adapter_conditioning_scale"] = adapter_weight
            return pipe(**kw).images[0]
    pipe = c.pipeline(scheduler)
    with attention_context(c, ctx):
        return pipe(**kw).images[0]
