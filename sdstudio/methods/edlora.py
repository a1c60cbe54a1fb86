"""EDLoRA (Mix-of-Show, arXiv 2305.18292): a concept = 2 new layer-wise tokens + LoRA on text encoder and UNet.

Each concept token has one embedding per UNet cross-attention layer (16 for SD1.x, in down -> mid -> up order).
A prompt is encoded once per layer with that layer's embedding in place of the token, giving conditioning of
shape (B, layers, 77, C); an attention processor feeds slice i to cross-attention layer i. The first token
starts random, the second from the class word; embeddings stop learning once their mean norm reaches a
threshold (0.55 in the paper), so the LoRA, not an ever-growing embedding, carries the identity.

File (.safetensors): `new_concept_embedding.<token>` (layers, dim) per token + kohya-named LoRA tensors
(`lora_te_*`, `lora_unet_*` with .alpha) + metadata (tokens, class word, base model, layer count).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..formats.metadata import shareable
from ..formats.kinds import kohya_te_name, kohya_unet_name
from ..fields import setting
from . import tokens as tk
from .base import MethodBase, ParamGroup, register
from .textual_inversion import options, output_stem

TE_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
UNET_TRANSFORMER = UNET_ATTN + ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
EMB_PREFIX = "new_concept_embedding."


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


def ensure_processors(unet, first_layer: str) -> None:
    """Put ours back if something replaced them (the loop enables xformers after `prepare`, for example)."""
    if not isinstance(unet.get_submodule(first_layer).processor, LayerwiseAttnProcessor):
        install_processors(unet)


# -- LoRA as forward hooks (module structure and state-dict names stay the base model's) ------------------

class LoRAHook(nn.Module):
    """y = W x + scale * up(down(x)) on a Linear or 1x1 Conv2d, added by a forward hook."""

    def __init__(self, base: nn.Module, rank: int, scale: float):
        super().__init__()
        conv = isinstance(base, nn.Conv2d)
        fin, fout = (base.in_channels, base.out_channels) if conv else (base.in_features, base.out_features)
        self.down = nn.Conv2d(fin, rank, 1, bias=False) if conv else nn.Linear(fin, rank, bias=False)
        self.up = nn.Conv2d(rank, fout, 1, bias=False) if conv else nn.Linear(rank, fout, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.to(base.weight.device)
        self.rank, self.scale = rank, scale
        self.handle = base.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        x = inputs[0]
        return output + self.scale * self.up(self.down(x.to(self.down.weight.dtype))).to(output.dtype)

    def delta(self) -> torch.Tensor:
        """The weight change this LoRA makes, shaped like the base weight."""
        d = self.up.weight.flatten(1) @ self.down.weight.flatten(1)
        return (self.scale * d).reshape(self.up.weight.shape[0], self.down.weight.shape[1],
                                        *self.up.weight.shape[2:])

    def remove(self):
        self.handle.remove()


def lora_targets(model, suffixes: tuple[str, ...], scope: str = "") -> list[str]:
    """Linear / 1x1-conv modules whose path ends with one of `suffixes` (inside `scope` when given)."""
    out = []
    for n, m in model.named_modules():
        if scope and scope not in n:
            continue
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)):
            if any(n.endswith(s) for s in suffixes):
                out.append(n)
    return out


def attach_loras(model, paths: list[str], rank: int, scale: float, namer) -> nn.ModuleDict:
    return nn.ModuleDict({namer(p): LoRAHook(model.get_submodule(p), rank, scale) for p in paths})


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


def parse_tokens(text: str) -> list[str]:
    toks = [t.lower() for t in text.replace(",", " ").split() if t]  # CLIP lowercases prompts and tokens
    if len(toks) != 2 or len(set(toks)) != 2:
        raise UserError(f"concept_tokens = {text!r} must be two different new words, e.g. '<anna1> <anna2>'.")
    return toks


# -- the method ----------------------------------------------------------------------------------------

@dataclass
class EDLoRAConfig:
    concept_tokens: str = setting("<sks1> <sks2>", "Two new words that name the concept in prompts, e.g. "
                                  "'<anna1> <anna2>'.")
    class_word: str = setting("person", "What the concept is (man, woman, dog, car): the second token starts "
                              "from it.")
    caption_trigger: str = setting("", "A word in your captions to replace by the two tokens (e.g. the dataset "
                                   "folder's token); empty: the tokens are put in front of each caption.")
    init_std: float = setting(0.013, "Spread of the first token's random start.", min=0.0, max=1.0, advanced=True)
    lora_rank: int = setting(4, "LoRA rank.", min=1, max=128)
    lora_alpha: float = setting(1.0, "Mix-of-Show alpha: the LoRA's output is multiplied by it (saved as kohya "
                                "alpha = alpha x rank).", min=0.0, max=64.0, advanced=True)
    unet_targets: str = setting("transformer", "UNet layers with LoRA: attention (q/k/v/out) or transformer "
                                "(also feed-forward and the 1x1 proj convs).", choices=("attention", "transformer"),
                                advanced=True)
    embedding_lr: float = setting(1e-3, "Learning rate of the layer-wise embeddings.", min=0.0, max=1.0)
    text_encoder_lr: float = setting(1e-5, "Learning rate of the text-encoder LoRA.", min=0.0, max=1.0)
    unet_lr: float = setting(1e-4, "Learning rate of the UNet LoRA.", min=0.0, max=1.0)
    emb_norm_threshold: float = setting(0.55, "Embeddings stop learning once their mean norm reaches this "
                                        "(0: never stop).", min=0.0, max=10.0, advanced=True)
    masked_loss: bool = setting(False, "Count the loss only inside subject masks: a white-on-black "
                                "<image>.mask.png beside each image.", advanced=True)
    clip_skip: int = setting(1, "Use the text encoder's n-th last layer.", min=1, max=4, advanced=True)


@register
class EDLoRA(MethodBase):
    name = "edlora"
    Config = EDLoRAConfig
    contract_settings = {"sample_prompts": '["a photo of <sks1> <sks2>"]'}

    def check_settings(self, cfg) -> None:
        tk.check_tokens_before_loading(parse_tokens(options(cfg).concept_tokens))

    def prepare(self, c, cfg) -> list[ParamGroup]:
        if c.family.is_xl:
            raise UserError("EDLoRA supports SD1.x/SD2.x base models: pick one of those as the base model.")
        o = options(cfg)
        self.cfg, self.o = cfg, o
        self.tokens = parse_tokens(o.concept_tokens)
        self.cross = cross_attention_layers(c.unet)
        self.layers = len(self.cross)
        install_processors(c.unet)
        # 1. Tokens: layers rows per concept token; the first random, the second from the class word.
        gen = torch.Generator().manual_seed(int(getattr(cfg, "seed", 0)))
        te, tok = c.text_encoder, c.tokenizer
        for t in self.tokens:
            tk.check_new_token(tok, t)
        inits = [tk.init_rows(te, tok, self.layers, "", o.init_std, gen),
                 tk.init_rows(te, tok, self.layers, o.class_word, 0.0)]
        table = concept_table(c)
        names = []
        for t in self.tokens:
            table[t] = layer_token_names(t, self.layers)
            names += table[t]
        self.emb = tk.add_new_tokens(tok, te, names, torch.cat(inits, 0))
        self.first = len(self.emb.new) - len(names)
        self.table = {t: table[t] for t in self.tokens}
        # 2. LoRA on the text encoder's attention and the UNet's attention (+ 1x1 convs).
        scale = o.lora_alpha
        te_paths = lora_targets(te, TE_TARGETS)
        unet_paths = lora_targets(c.unet, UNET_TRANSFORMER if o.unet_targets == "transformer" else UNET_ATTN,
                                  scope=".attentions.")
        self.te_lora = attach_loras(te, te_paths, o.lora_rank, scale, kohya_te_name)
        self.unet_lora = attach_loras(c.unet, unet_paths, o.lora_rank, scale, kohya_unet_name)
        self.stopped_at: int | None = None
        return [ParamGroup("embeddings", [self.emb.new], lr=o.embedding_lr, weight_decay=0.0),
                ParamGroup("text_encoder_lora", list(self.te_lora.parameters()), lr=o.text_encoder_lr),
                ParamGroup("unet_lora", list(self.unet_lora.parameters()), lr=o.unet_lr)]

    def rows(self) -> torch.Tensor:
        return self.emb.new[self.first:self.first + 2 * self.layers]

    def prompt(self, caption: str) -> str:
        both = " ".join(self.tokens)
        if self.o.caption_trigger and tk.replace_word(caption, self.o.caption_trigger, "\0") != caption:
            return tk.replace_word(caption, self.o.caption_trigger, both)
        if all(tk.replace_word(caption, t, "\0") != caption for t in self.tokens):
            return caption
        return f"{both}, {caption}" if caption.strip() else f"a photo of {both}"

    def encode(self, c, captions: list[str]) -> torch.Tensor:
        return encode_layerwise(c, [self.prompt(x) for x in captions], self.table, self.layers, self.o.clip_skip)

    def embedding_norm(self) -> float:
        return float(self.rows().detach().float().norm(dim=-1).mean())

    def loss(self, c, batch, step: int) -> torch.Tensor:
        import dataclasses

        from ..train.noise import denoising_loss

        # Mix-of-Show: once the embeddings' mean norm reaches the threshold they stop learning for good (a resumed
        # run re-detects it at its first step, since the norm is in the checkpointed rows).
        if self.stopped_at is None and self.o.emb_norm_threshold and self.embedding_norm() >= self.o.emb_norm_threshold:
            self.stopped_at = step
            self.emb.frozen = True
        ensure_processors(c.unet, self.cross[0])
        if not self.o.masked_loss and batch.mask is not None:
            batch = dataclasses.replace(batch, mask=None)
        return denoising_loss(c, batch, self.cfg, encoder_hidden_states=self.encode(c, batch.captions))

    # Checkpoints: the LoRA hooks live beside the models (not inside them), so list them explicitly.
    def trainable_state_dict(self, c) -> dict:
        out = {"embeddings": self.emb.new.detach()}
        out.update({f"te_lora.{k}": v.detach() for k, v in self.te_lora.state_dict().items()})
        out.update({f"unet_lora.{k}": v.detach() for k, v in self.unet_lora.state_dict().items()})
        return out

    def load_trainable_state_dict(self, c, sd: dict) -> None:
        with torch.no_grad():
            self.emb.new.copy_(sd["embeddings"])
            for prefix, mods in (("te_lora.", self.te_lora), ("unet_lora.", self.unet_lora)):
                mods.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})

    def preview_pipeline(self, c):
        return LayerwisePipeline(c)

    def load_output(self, pipe, paths: list[Path]):
        """A diffusers pipeline cannot feed one embedding per layer: wrap its modules in a LayerwisePipeline."""
        from ..models.families import detect_family_from_unet_config
        from ..models.loading import Components

        c = Components(unet=pipe.unet, vae=pipe.vae, text_encoders=[pipe.text_encoder], tokenizers=[pipe.tokenizer],
                       scheduler=pipe.scheduler, family=detect_family_from_unet_config(dict(pipe.unet.config)),
                       ref="pipeline")
        apply_edlora(c, paths[0])
        return LayerwisePipeline(c)

    def state_dict_to_save(self, c) -> tuple[dict, dict]:
        tensors = {}
        rows = self.rows().detach().float().cpu()
        for i, t in enumerate(self.tokens):
            tensors[EMB_PREFIX + t] = rows[i * self.layers:(i + 1) * self.layers].clone()
        for loras in (self.te_lora, self.unet_lora):
            for name, h in loras.items():
                tensors[f"{name}.lora_down.weight"] = h.down.weight.detach().float().cpu()
                tensors[f"{name}.lora_up.weight"] = h.up.weight.detach().float().cpu()
                tensors[f"{name}.alpha"] = torch.tensor(float(h.scale * h.rank))
        meta = {}
        if self.run is not None:
            from ..formats.metadata import training_metadata

            meta = training_metadata(self.run, c.family, network_dim=self.o.lora_rank,
                                     network_alpha=self.o.lora_alpha * self.o.lora_rank, kind="edlora")
        meta |= {"sdstudio.method": "edlora", "sdstudio.base_model": shareable(str(c.ref)), "sdstudio.family": c.family.name,
                "sdstudio.concept_tokens": " ".join(self.tokens), "sdstudio.class_word": self.o.class_word,
                "sdstudio.layers": str(self.layers), "sdstudio.clip_skip": str(self.o.clip_skip),
                "sdstudio.embedding_stopped_at": str(self.stopped_at)}
        return tensors, meta

    def save(self, c, out: Path) -> list[Path]:
        from ..formats.safe_io import save_safetensors

        tensors, meta = self.state_dict_to_save(c)
        stem = output_stem(self.cfg, out)
        return [save_safetensors(tensors, stem.with_name(stem.name + ".safetensors"), meta)]


class LayerwisePipeline:
    """What previews call like a diffusers pipeline, drawing with layer-wise conditioning (regions.generate)."""

    def __init__(self, c, scheduler=None):
        from diffusers import DPMSolverMultistepScheduler

        self.c = c
        self.scheduler = scheduler or DPMSolverMultistepScheduler.from_config(c.scheduler.config)

    def __call__(self, prompt, negative_prompt="", num_inference_steps=20, guidance_scale=7.0, height=512,
                 width=512, generator=None, output_type="pil", **_):
        from types import SimpleNamespace

        from ..playground.regions import generate

        img = generate(self.c, prompt, negative_prompt or "", [], steps=num_inference_steps, guidance=guidance_scale,
                       height=height, width=width, scheduler=self.scheduler, generator=generator,
                       output_type=output_type)
        return SimpleNamespace(images=[img])


# -- loading an EDLoRA file (Playground, fusion) ----------------------------------------------------------

@dataclass
class EDLoRAFile:
    path: Path
    embeddings: dict  # {token: (layers, dim)}
    lora: dict  # {kohya module name: {"lora_down.weight", "lora_up.weight", "alpha"}}
    meta: dict

    @property
    def tokens(self) -> list[str]:
        return list(self.embeddings)

    @property
    def layers(self) -> int:
        return next(iter(self.embeddings.values())).shape[0]

    def deltas(self, model, kind: str, weight: float = 1.0) -> dict[str, torch.Tensor]:
        """{module path: weight change} for `model` ("te" or "unet"), alpha/rank applied per module."""
        from ..formats.kinds import kohya_names_for

        names = kohya_names_for(model, kind)
        out = {}
        for name, g in self.lora.items():
            if name not in names:
                continue
            down, up = g["lora_down.weight"].float(), g["lora_up.weight"].float()
            rank = down.shape[0]
            scale = float(g["alpha"]) / rank if "alpha" in g else 1.0
            d = (up.flatten(1) @ down.flatten(1)) * scale * weight
            out[names[name]] = d.reshape(up.shape[0], down.shape[1], *up.shape[2:])
        return out


def read_edlora(path: Path | str) -> EDLoRAFile:
    from ..formats.kinds import group_kohya
    from ..formats.safe_io import load_state_dict, read_safetensors_metadata

    path = Path(path)
    sd = load_state_dict(path)
    emb = {k[len(EMB_PREFIX):]: v for k, v in sd.items() if k.startswith(EMB_PREFIX)}
    if not emb:
        raise UserError(f"{path.name} is not an EDLoRA file (it has no new_concept_embedding.* tensors): "
                        "train one with method = 'edlora'.")
    return EDLoRAFile(path, emb, group_kohya(sd), read_safetensors_metadata(path))


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


class AppliedEDLoRA:
    """An EDLoRA concept live on Components: its tokens, LoRA hooks (removable) and layer-wise processors."""

    def __init__(self, f: EDLoRAFile, hooks: list):
        self.file, self.hooks = f, hooks

    def set_weight(self, weight: float) -> None:
        for h in self.hooks:
            h.scale = h.base_scale * weight

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


def apply_edlora(c, path: Path | str | EDLoRAFile, weight: float = 1.0, ctx: AttnContext | None = None
                 ) -> AppliedEDLoRA:
    """Load an EDLoRA concept into `c` so prompts can use its tokens: adds the tokens (once), hooks the LoRA at
    `weight` and installs the layer-wise processors. `remove()` takes the LoRA off again."""
    f = path if isinstance(path, EDLoRAFile) else read_edlora(path)
    check_base(c, f)
    table = concept_table(c)
    new = [t for t in f.tokens if t not in table]
    if new and len(new) != len(f.tokens):
        raise UserError(f"{f.path.name} shares some of its tokens {f.tokens} with a concept already loaded: "
                        "concept names must not overlap.")
    add_concept_tokens(c, f)
    install_processors(c.unet, ctx)
    hooks = []
    for model, kind in ((c.text_encoder, "te"), (c.unet, "unet")):
        from ..formats.kinds import kohya_names_for

        names = kohya_names_for(model, kind)
        for name, g in f.lora.items():
            if name not in names:
                continue
            down, up = g["lora_down.weight"], g["lora_up.weight"]
            mod = model.get_submodule(names[name])
            h = LoRAHook(mod, down.shape[0], 1.0)
            h.down.weight.data.copy_(down.reshape(h.down.weight.shape))
            h.up.weight.data.copy_(up.reshape(h.up.weight.shape))
            h.base_scale = float(g["alpha"]) / down.shape[0] if "alpha" in g else 1.0
            h.scale = h.base_scale * weight
            h.to(mod.weight.device, mod.weight.dtype)
            hooks.append(h)
    return AppliedEDLoRA(f, hooks)


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
    emb = {k[len(EMB_PREFIX):]: v for k, v in sd.items() if k.startswith(EMB_PREFIX)}
    f = EDLoRAFile(Path(path), emb, {}, meta)
    check_base(c, f)
    add_concept_tokens(c, f)
    return {k: v for k, v in sd.items() if not k.startswith(EMB_PREFIX)}
