"""Layer-wise prompts (Mix-of-Show): one text conditioning per UNet cross-attention layer, so a concept's
layer-wise tokens (EDLoRA) reach each layer with that layer's embedding.

Each concept token has one embedding per cross-attention layer (16 for SD1.x, in down -> mid -> up order). A
prompt is encoded once per layer with that layer's token in place of the concept's, giving conditioning of shape
(B, layers, 77, C); `LayerwiseAttnProcessor` feeds slice i to cross-attention layer i. EDLoRA training, its
previews, fusion, region sampling and the Playground all use this: it sits below methods/ and playground/.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from ..formats.edlora import EDLoRAFile, concept_embeddings, without_embeddings
from . import tokens as tk


# -- cross-attention layers and the layer-wise processor --------------------------------------------------

def cross_attention_layers(unet) -> list[str]:
    """Module paths of the UNet's cross-attention layers in down -> mid -> up order (named_modules lists up_blocks
    before mid_block, so the order is built explicitly, as Mix-of-Show does)."""
    names = [n for n, m in unet.named_modules() if n.endswith("attn2") and hasattr(m, "set_processor")]
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(names, key=lambda n: (rank[n.split(".")[0]], names.index(n)))


class AttnContext:
    """What the processors read during one generation: layer-wise states (for pipelines that can only pass 3-D
    prompt embeddings) and regions (playground/regions.py)."""

    def __init__(self):
        self.layer_states: torch.Tensor | None = None  # (N, layers, 77, C); the pipeline gets [:, 0]
        self.regions: list = []
        self.size: tuple[int, int] | None = None  # latent (h, w)


def _aligned(states: torch.Tensor, ehs: torch.Tensor) -> torch.Tensor | None:
    """`states` repeated to `ehs`'s batch, when its layer-0 slice is exactly what the pipeline passed."""
    n = states.shape[0]
    if ehs.shape[0] % n:
        return None
    st = states.repeat_interleave(ehs.shape[0] // n, 0) if ehs.shape[0] != n else states
    first = st[:, 0].to(ehs.device, ehs.dtype)
    return st.to(ehs.device, ehs.dtype) if first.shape == ehs.shape and torch.equal(first, ehs) else None


class LayerwiseAttnProcessor:
    """Cross-attention layer `index` takes its own slice of layer-wise conditioning, else the plain one."""

    def __init__(self, index: int, ctx: AttnContext | None = None, inner=None):
        from diffusers.models.attention_processor import AttnProcessor2_0

        # `inner` does the attention itself: whatever the layer had (SDPA, xformers, ...), so ours only chooses
        # what each layer attends to.
        self.index, self.ctx, self.inner = index, ctx, inner or AttnProcessor2_0()

    def pick(self, ehs):
        if ehs is None:
            return None
        if ehs.ndim == 4:
            return ehs[:, self.index]
        if self.ctx is not None and self.ctx.layer_states is not None:
            st = _aligned(self.ctx.layer_states, ehs)
            if st is not None:
                return st[:, self.index]
        return ehs

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        return self.inner(attn, hidden_states, self.pick(encoder_hidden_states), attention_mask, temb)


def install_processors(unet, ctx: AttnContext | None = None, cls=LayerwiseAttnProcessor) -> dict:
    """Put `cls(index, ctx)` on every cross-attention layer; returns the previous processors (to restore)."""
    before = dict(unet.attn_processors)
    procs = dict(before)
    for i, name in enumerate(cross_attention_layers(unet)):
        inner = procs[f"{name}.processor"]
        while isinstance(inner, LayerwiseAttnProcessor):
            inner = inner.inner
        procs[f"{name}.processor"] = cls(i, ctx, inner)
    unet.set_attn_processor(procs)
    return before


def ensure_processors(unet, first_layer: str, ctx: AttnContext | None = None, cls=LayerwiseAttnProcessor) -> None:
    """Put ours back if something replaced them (the loop enables xformers after `prepare`, for example)."""
    proc = unet.get_submodule(first_layer).processor
    if not isinstance(proc, cls) or proc.ctx is not ctx:
        install_processors(unet, ctx, cls)


# -- prompts -------------------------------------------------------------------------------------------

def layer_token_names(token: str, layers: int) -> list[str]:
    return [f"{token}#{i:02d}" for i in range(layers)]


def layer_prompts(prompt: str, table: dict[str, list[str]], layers: int) -> list[str]:
    """One prompt per cross-attention layer, each concept token replaced by that layer's token."""
    out = []
    for i in range(layers):
        p = prompt
        for token, names in table.items():
            p = tk.replace_word(p, token, names[i])
        out.append(p)
    return out


def encode_layerwise(c, prompts: list[str], table: dict[str, list[str]], layers: int,
                     clip_skip: int = 1) -> torch.Tensor:
    """(B, layers, 77, C) conditioning. Identical per-layer prompts (no concept token) are encoded once."""
    per = [layer_prompts(p, table, layers) for p in prompts]
    unique = list(dict.fromkeys(x for ps in per for x in ps))
    ids = tk.tokenize(c.tokenizer, unique, c.text_encoder.device)
    enc = tk.encode_text(c.text_encoder, ids, clip_skip)
    index = {p: i for i, p in enumerate(unique)}
    gather = torch.tensor([[index[x] for x in ps] for ps in per], device=enc.device)
    return enc[gather]


def concept_table(c) -> dict[str, list[str]]:
    """{concept token: its per-layer token names} for every EDLoRA concept loaded into these components. A fused
    model (a diffusers folder from `sdstudio fuse`) brings its own table in new_concept_cfg.json."""
    if "edlora_tokens" not in c.extra:
        table = {}
        src = Path(c.source) if c.source else None
        cfg_file = src / "new_concept_cfg.json" if src is not None and src.is_dir() else None
        if cfg_file is not None and cfg_file.is_file():
            for token, v in json.loads(cfg_file.read_text(encoding="utf-8")).items():
                table[token] = list(v["concept_token_names"])
        c.extra["edlora_tokens"] = table
    return c.extra["edlora_tokens"]



# -- concept tokens on loaded components ------------------------------------------------------------

def check_base(c, f: EDLoRAFile) -> None:
    """The file must fit this base: same text width and the same number of cross-attention layers."""
    dim = c.text_encoder.get_input_embeddings().embedding_dim
    layers = len(cross_attention_layers(c.unet))
    rows = next(iter(f.embeddings.values()))
    fam = f.meta.get("sdstudio.family")
    if rows.shape[1] != dim or rows.shape[0] != layers or (fam and fam != c.family.name):
        raise UserError(f"{f.path.name} was trained on another base model ({f.meta.get('sdstudio.base_model', '?')}"
                        f", {rows.shape[0]} layers x {rows.shape[1]}) than {c.ref} ({layers} x {dim}): "
                        "use it with the base model it was trained on.")


def add_concept_tokens(c, f: EDLoRAFile) -> None:
    """Give `c` the file's layer-wise tokens once (a plain, resized embedding table, as other loaders expect)."""
    table = concept_table(c)
    new = [t for t in f.tokens if t not in table]
    if new and len(new) != len(f.tokens):
        raise UserError(f"{f.path.name} shares some of its tokens {f.tokens} with a concept already loaded: "
                        "concept names must not overlap.")
    if not new:
        return
    names, rows = [], []
    for t in f.tokens:
        names += layer_token_names(t, f.layers)
        rows.append(f.embeddings[t])
    tk.add_new_tokens(c.tokenizer, c.text_encoder, names, torch.cat(rows, 0))
    tk.bake(c.text_encoder)
    for t in f.tokens:
        table[t] = layer_token_names(t, f.layers)


def load_concept_tokens(c, sd: dict, meta: dict, path: Path) -> dict:
    """The Playground's door for an EDLoRA file added as a LoRA item: its tokens go into `c` (checked against
    the base), and the rest of the state dict (a kohya LoRA) is returned for the LoRA loader."""
    f = EDLoRAFile(Path(path), concept_embeddings(sd), {}, meta)
    check_base(c, f)
    add_concept_tokens(c, f)
    return without_embeddings(sd)
