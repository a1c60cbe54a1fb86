"""GLIGEN in the Playground: `[[grounding]]` phrases placed in boxes steer the UNet's gated self-attention.

Where the gated layers come from:
- a full gated checkpoint (a diffusers folder whose UNet has `attention_type = "gated"`): the base's own;
- a GLIGEN module file (the released / ComfyUI layout, formats/gligen.py) applied to a plain base, as ComfyUI
  does: its fusers and position net are attached to the loaded UNet, and taken off again (the base's own
  restored) when the recipe drops it. Nothing else in the base changes.

How they run: diffusers' UNet already has the seam, `cross_attention_kwargs["gligen"]`, which feeds the position
net once per call and each transformer block's fuser after its self-attention.
- Each phrase becomes the text encoder's pooled output and each box its (x0, y0, x1, y1) fractions, padded to
  30 objects with a mask, as diffusers' GLIGEN pipeline and ComfyUI do.
- With CFG, the conditional rows get the objects and the unconditional rows the null objects (mask 0), as the
  original GLIGEN sampler does.
- Scheduled sampling: the first `grounding_fraction` of the steps pass the objects; after that the gated layers
  are skipped and a step is exactly the plain base's. No boxes, or a fraction of 0, is the base exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError

MAX_OBJECTS = 30  # the released models' position net is trained with 30 slots


def gated_blocks(unet) -> list:
    """The transformer blocks that carry a GLIGEN fuser, in module order."""
    return [m for m in unet.modules() if getattr(m, "fuser", None) is not None and hasattr(m, "attn1")]


def has_gated_layers(unet) -> bool:
    return getattr(unet, "position_net", None) is not None and bool(gated_blocks(unet))


# -- a module file on a plain base (ComfyUI's way) -----------------------------------------------------------

@dataclass
class Attached:
    """A GLIGEN module put onto a UNet; `detach()` restores what was there before."""

    unet: object
    key: tuple  # (path, mtime) of the file it came from
    before: dict = field(default_factory=dict)  # module path -> the previous fuser / position net (or None)

    def detach(self) -> None:
        for path, old in self.before.items():
            owner, _, name = path.rpartition(".")
            parent = self.unet.get_submodule(owner) if owner else self.unet
            if old is None:
                delattr(parent, name)
            else:
                setattr(parent, name, old)
        self.before = {}


def attach_module(unet, sd: dict, name: str, key: tuple = ()) -> Attached:
    """Attach a GLIGEN module (tensors in the module-file layout) to `unet`: a fuser on each transformer block it
    names and a text-box position net. Refuses a module made for another model, in one sentence."""
    from diffusers.models.attention import GatedSelfAttentionDense
    from diffusers.models.embeddings import GLIGENTextBoundingboxProjection

    from ..formats.gligen import FUSER, check_module, fuser_paths, module_to_unet

    check_module(sd, name)
    tensors = module_to_unet(sd, unet.config)
    key_dim = int(tensors["position_net.null_positive_feature"].shape[0])
    ctx_dim = unet.config.cross_attention_dim
    ctx_dim = ctx_dim[0] if isinstance(ctx_dim, (list, tuple)) else ctx_dim
    if key_dim != ctx_dim:
        raise UserError(f"{name} is a GLIGEN model for {key_dim}-wide text features, this base has {ctx_dim}: use a "
                        f"GLIGEN model made for this base (SD 1.x GLIGEN models need an SD 1.x base).")
    dtype, device = unet.dtype, unet.device
    fusers: dict[str, torch.nn.Module] = {}
    for path in fuser_paths(tensors):
        try:
            block = unet.get_submodule(path)
        except AttributeError:
            block = None
        if block is None or not hasattr(block, "attn1"):
            raise UserError(f"{name} has a fuser for {path}, which this base does not have: it was made for another "
                            f"model architecture.")
        dim = block.attn1.to_q.in_features
        own = {k[len(path) + len(FUSER):]: v for k, v in tensors.items() if k.startswith(path + FUSER)}
        if own["linear.weight"].shape != (dim, key_dim):
            shape = tuple(own["linear.weight"].shape)
            raise UserError(f"{name}'s fuser for {path} is {shape}, this base's block needs ({dim}, {key_dim}): it was "
                            f"made for another model.")
        heads = block.attn1.heads
        fuser = GatedSelfAttentionDense(dim, key_dim, heads, dim // heads)
        _load(fuser, own, f"{name} ({path})")
        fusers[path] = fuser.to(device=device, dtype=dtype).eval().requires_grad_(False)
    out_dim = int(tensors["position_net.linears.4.weight"].shape[0])
    position_net = GLIGENTextBoundingboxProjection(positive_len=key_dim, out_dim=out_dim, feature_type="text-only")
    _load(position_net, {k[len("position_net."):]: v for k, v in tensors.items() if k.startswith("position_net.")},
          f"{name} (position net)")
    position_net = position_net.to(device=device, dtype=dtype).eval().requires_grad_(False)

    handle = Attached(unet, key)
    for path, fuser in fusers.items():
        block = unet.get_submodule(path)
        handle.before[f"{path}.fuser"] = getattr(block, "fuser", None)
        block.fuser = fuser
    handle.before["position_net"] = getattr(unet, "position_net", None)
    unet.position_net = position_net
    return handle


def _load(module, sd: dict, where: str) -> None:
    want = module.state_dict()
    missing = sorted(set(want) - set(sd))
    if missing:
        raise UserError(f"{where} lacks {missing[0]}: the GLIGEN file is incomplete.")
    for k, v in want.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise UserError(f"{where} has {k} of shape {tuple(sd[k].shape)} where {tuple(v.shape)} is needed: the "
                            f"GLIGEN file was made for another model.")
    module.load_state_dict({k: sd[k] for k in want})


class ModuleSlot:
    """The GLIGEN module a session's UNet carries now: attached when a recipe asks for one (read once per file
    version), detached when it no longer does or the base changes."""

    def __init__(self) -> None:
        self.attached: Attached | None = None
        self.reads = 0  # file reads, for tests and benchmarks

    def apply(self, unet, path: Path | None, allow_pickle: bool = False) -> None:
        if self.attached is not None and self.attached.unet is not unet:
            self.attached = None  # a new base: the old one is gone with its layers
        if path is None:
            self.clear()
            return
        key = (str(path), path.stat().st_mtime_ns if path.exists() else 0)
        if self.attached is not None and self.attached.key == key:
            return
        self.clear()
        from ..formats.gligen import read_module

        sd, _meta = read_module(path, allow_pickle)
        self.reads += 1
        self.attached = attach_module(unet, sd, path.name, key)

    def clear(self) -> None:
        if self.attached is not None:
            self.attached.detach()
            self.attached = None


def base_module(comps) -> Path | None:
    """A single-file base that carries GLIGEN layers (an original-layout full GLIGEN checkpoint): diffusers loads
    its plain part, and its GLIGEN part is attached from the same file."""
    from ..formats.gligen import checkpoint_has_gligen

    key = "gligen_in_file"  # found once per loaded base (before anything is attached to it)
    if key not in comps.extra:
        src = getattr(comps, "source", None)
        own = src is None or has_gated_layers(comps.unet) or not checkpoint_has_gligen(src)
        comps.extra[key] = None if own else Path(src)
    return comps.extra[key]


# -- the Playground pipeline's hook ---------------------------------------------------------------------------

class Grounding:
    """What playground/pipeline.generate asks once per step: the UNet keyword arguments for step i (the GLIGEN
    objects while grounding is on; nothing after, so the step is the base's own)."""

    def __init__(self, kwargs: dict | None = None, fraction: float = 0.0) -> None:
        self.kwargs, self.fraction = kwargs, fraction

    def steps_on(self, total: int) -> int:
        # diffusers' rule: int(beta * steps) grounded steps, then plain ones
        return int(self.fraction * total) if self.kwargs is not None else 0

    def unet_kwargs(self, i: int, total: int) -> dict:
        if self.kwargs is None or i >= self.steps_on(total):
            return {}
        return {"cross_attention_kwargs": {"gligen": self.kwargs}}


def phrase_tokens(tokenizer, phrase: str) -> int:
    """Tokens with the start and end tokens (counted without encoding, which warns past the limit)."""
    return len(tokenizer.tokenize(phrase)) + 2


def phrase_limit(tokenizer) -> int:
    """Tokens a phrase may have, start and end tokens included (77 for CLIP)."""
    n = tokenizer.model_max_length
    return n if n and n < 10_000 else 77


def check_phrase(tokenizer, phrase: str, text: str | None = None) -> None:
    """One sentence when a grounding phrase (read by the text encoder as `text`) is too long for it."""
    limit = phrase_limit(tokenizer)
    n = phrase_tokens(tokenizer, phrase if text is None else text)
    if n > limit:
        short = phrase if len(phrase) <= 40 else phrase[:37] + "..."
        raise UserError(f"The grounding phrase {short!r} is {n - 2} tokens; GLIGEN reads at most {limit - 2}: "
                        f"shorten it.")


def encode_phrases(tokenizer, text_encoder, texts: list[str]) -> torch.Tensor:
    """(n, dim) phrase features: the text encoder's pooled (end-token, unprojected) output, what GLIGEN's position
    net reads (diffusers' GLIGEN pipeline and ComfyUI's GLIGENTextBoxApply use the same)."""
    ids = tokenizer(texts, padding="max_length", max_length=phrase_limit(tokenizer), truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device)).pooler_output


def recipe_grounding(comps, recipe, expand, batch: int, use_cfg: bool) -> Grounding:
    """The grounding inputs for a recipe's enabled `[[grounding]]` items, or an inactive Grounding.

    `expand(text)` turns embedding tokens into what the text encoder reads (the Stack's expand_prompt)."""
    items = [it for it in getattr(recipe, "grounding", []) if it.enabled]
    fraction = float(getattr(recipe, "grounding_fraction", 0.0))
    if not items or fraction <= 0:
        return Grounding()
    unet = comps.unet
    if not has_gated_layers(unet):
        raise UserError(f"The base {Path(str(recipe.base_model)).name} has no GLIGEN layers, so it cannot place "
                        f"phrases in boxes: pick a GLIGEN model as the base, or a GLIGEN module file to apply to it.")
    if len(items) > MAX_OBJECTS:
        raise UserError(f"{len(items)} grounding boxes: GLIGEN places at most {MAX_OBJECTS}; remove some.")
    tok, te = comps.tokenizers[0], comps.text_encoders[0]
    texts = []
    for it in items:
        text = expand(it.phrase)
        check_phrase(tok, it.phrase, text)
        texts.append(text)
    device, dtype = unet.device, unet.dtype
    pooled = encode_phrases(tok, te, texts).to(device=device, dtype=dtype)
    key_dim = unet.position_net.positive_len
    if pooled.shape[-1] != key_dim:
        raise UserError(f"This base's text encoder gives {pooled.shape[-1]}-wide phrases, its GLIGEN layers read "
                        f"{key_dim}: the GLIGEN model does not belong to this base.")
    n = len(items)
    boxes = torch.zeros(MAX_OBJECTS, 4, device=device, dtype=dtype)
    boxes[:n] = torch.tensor([list(it.box) for it in items], device=device, dtype=dtype)
    emb = torch.zeros(MAX_OBJECTS, key_dim, device=device, dtype=dtype)
    emb[:n] = pooled
    masks = torch.zeros(MAX_OBJECTS, device=device, dtype=dtype)
    masks[:n] = 1
    rows = 2 * batch if use_cfg else batch
    boxes, emb, masks = boxes.expand(rows, -1, -1), emb.expand(rows, -1, -1), masks.expand(rows, -1).clone()
    if use_cfg:
        masks[:batch] = 0  # the unconditional rows ([negative x batch, positive x batch]) see the null objects
    return Grounding({"boxes": boxes, "positive_embeddings": emb, "masks": masks}, fraction)
