"""The Playground's hook for regions (`[[region]]`) and EDLoRA tokens in its own denoising loop: the recipe's region
items as Regions, the layer-wise conditioning, per-region T2I-Adapter weights and the attention processors for
one generation. Region sampling itself (boxes, masks, the processors) is concepts/regions.py, which EDLoRA
previews use too.

A recipe's [[region]] may give Mix-of-Show's [top, left, bottom, right] pixel boxes (box_format = "mixofshow",
playground/recipe.py); `regions_from_items` converts them to the fractions concepts/regions.py works in."""
from __future__ import annotations

import math

import torch

from ..concepts.layerwise import AttnContext, concept_table, cross_attention_layers, install_processors, layer_prompts
from ..concepts.regions import Region, RegionAttnProcessor
from ..concepts.tokens import replace_word
from ..errors import UserError


def regions_from_items(items, width: int | None = None, height: int | None = None) -> list[Region]:
    """Regions from recipe items (dicts or objects with prompt, box, box_format, negative_prompt, t2i_weight).
    Boxes in another format than fractions (Mix-of-Show's pixels) need the image's `width` and `height`."""
    from .recipe import box_to_fractions, split_box_format
    from .recipe import parse_box as parse_numbers

    out = []
    for it in items or []:
        get = (lambda k, d=None: it.get(k, d)) if isinstance(it, dict) else (lambda k, d=None: getattr(it, k, d))
        prefix, box = split_box_format(get("box"))
        fmt = prefix or get("box_format") or "fractions"
        if fmt != "fractions":
            if width is None or height is None:
                raise UserError(f"A region box in the {fmt} format needs the image size to convert it.")
            box = box_to_fractions(parse_numbers(box, allow_empty=True), fmt, width, height)
        out.append(Region(prompt=get("prompt", ""), box=box, negative_prompt=get("negative_prompt"),
                          t2i_weight=get("t2i_weight")))
    return out


# -- the Playground pipeline's hook ---------------------------------------------------------------------

class RecipeAttention:
    """What playground/pipeline.generate asks for once per generation: the conditioning to call the UNet with
    (`emb`: layer 0 when EDLoRA tokens are in play), per-region T2I-Adapter weights, and the processors, which
    `install()` puts on the UNet and `close()` takes off (call it in a `finally`)."""

    def __init__(self, comps, emb, ctx: AttnContext | None = None, regions=(), adapter_weights=()):
        self.comps, self.emb, self.ctx = comps, emb, ctx
        self.regions, self.adapter_weights = list(regions), list(adapter_weights)
        self._before = None

    def install(self) -> None:
        if self.ctx is not None and self._before is None:
            self._before = install_processors(self.comps.unet, self.ctx, RegionAttnProcessor)

    def close(self) -> None:
        if self._before is not None:
            self.comps.unet.set_attn_processor(self._before)
            self._before = None

    def adapter_features(self, k: int, feats):
        """T2I-Adapter k's features with each region's t2i_weight inside its box. The pipeline multiplies by the
        adapter's global weight w afterwards, so the map holds t2i_weight / w there and 1 elsewhere."""
        w = self.adapter_weights[k] if k < len(self.adapter_weights) else 1.0
        if not w or not any(r.t2i_weight is not None for r in self.regions):
            return feats
        out = []
        for f in feats:
            h, wd = f.shape[-2:]
            wmap = torch.ones((h, wd), device=f.device, dtype=f.dtype)
            for r in self.regions:
                if r.t2i_weight is not None:
                    wmap[r.mask(h, wd, f.device)] = float(r.t2i_weight) / float(w)
            out.append(f * wmap)
        return out


def recipe_attention(comps, recipe, encode, chunks, emb, batch: int, use_cfg: bool, adapter_weights=()
                     ) -> RecipeAttention:
    """Regions (`[[region]]`) and EDLoRA tokens for the Playground's own denoising loop.

    `encode(text, n_chunks)` is the Playground's prompt encoder (A1111 weighting, embeddings, clip skip) and
    `chunks(text)` its chunk count; `emb` is what it made for the global prompts, ordered
    [negative x batch, positive x batch] when CFG is on."""
    regions = regions_from_items([r for r in getattr(recipe, "region", []) if getattr(r, "enabled", True)],
                                 recipe.width, recipe.height)
    for r in regions:
        if r.negative_prompt == "":
            r.negative_prompt = None  # an empty region negative means: the global one
    table = concept_table(comps)
    texts = [recipe.prompt, recipe.negative_prompt] + [t for r in regions for t in (r.prompt, r.negative_prompt or "")]
    uses_tokens = bool(table) and any(tk_in(t, table) for t in texts)
    if not regions and not uses_tokens:
        return RecipeAttention(comps, emb)
    layers = len(cross_attention_layers(comps.unet))
    def layerwise(text: str, n: int):
        variants = layer_prompts(text, table, layers) if uses_tokens else [text]
        cache: dict[str, torch.Tensor] = {}
        for v in variants:
            if v not in cache:
                cache[v] = encode(v, n)
        return torch.stack([cache[v] for v in variants], 1)  # (1, layers or 1, seq, C)

    def pair(pos_text: str, neg_text: str):
        n = max(chunks(pos_text), chunks(neg_text))
        pos = layerwise(pos_text, n).expand(batch, -1, -1, -1)
        if not use_cfg:
            return pos
        return torch.cat([layerwise(neg_text, n).expand(batch, -1, -1, -1), pos])

    ctx = AttnContext()
    ctx.size = (math.ceil(recipe.height / 8), math.ceil(recipe.width / 8))
    if uses_tokens:
        ctx.layer_states = pair(recipe.prompt, recipe.negative_prompt).to(emb.dtype)
        emb = ctx.layer_states[:, 0].contiguous()  # what the UNet is called with; each layer swaps in its own
    for r in regions:
        st = pair(r.prompt, r.negative_prompt if r.negative_prompt is not None else recipe.negative_prompt)
        ctx.regions.append((r, (st if uses_tokens else st[:, 0]).to(emb.dtype)))
    return RecipeAttention(comps, emb, ctx, regions, adapter_weights)


def tk_in(text: str, table: dict) -> bool:
    return any(replace_word(text, t, "\0") != text for t in table)
