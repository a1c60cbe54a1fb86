"""EDLoRA (Mix-of-Show, arXiv 2305.18292): a concept = 2 new layer-wise tokens + LoRA on text encoder and UNet.

Each concept token has one embedding per UNet cross-attention layer (16 for SD1.x, in down -> mid -> up order).
A prompt is encoded once per layer with that layer's embedding in place of the token, giving conditioning of
shape (B, layers, 77, C); an attention processor feeds slice i to cross-attention layer i (concepts/layerwise.py,
which the Playground and region sampling share). The first token
starts from one random vector copied to every layer, the second from the class word; embeddings stop learning
once their mean norm reaches a threshold (0.55 in the paper), so the LoRA, not an ever-growing embedding,
carries the identity.

Defaults follow TencentARC/Mix-of-Show's shipped configs (options/train/EDLoRA/*, commit 51270fd): LoRA rank 4,
alpha 1 on the text encoder's and the UNet's attention q/k/v/out (128 UNet modules on SD1.5), lrs 1e-3 / 1e-5 /
1e-4, AdamW weight decay 0.01 on every group (the embeddings too), no gradient clipping, and the attention
regularisation at 0.01 (methods/attention_reg.py), which needs subject masks.

File (.safetensors): `new_concept_embedding.<token>` (layers, dim) per token + kohya-named LoRA tensors
(`lora_te_*`, `lora_unet_*` with .alpha) + metadata (tokens, class word, base model, layer count).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..formats.metadata import shareable
from ..formats.kinds import kohya_te_name, kohya_unet_name
from ..concepts import tokens as tk
from ..concepts.layerwise import (AttnContext, LayerwiseAttnProcessor, add_concept_tokens, check_base,
                                  concept_table, cross_attention_layers, encode_layerwise, ensure_processors,
                                  install_processors, layer_prompts, layer_token_names)
from ..fields import setting
from ..formats.edlora import EDLoRAFile, edlora_state_dict, read_edlora
from .base import MethodBase, ParamGroup, register
from .textual_inversion import options, output_stem

TE_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
UNET_TRANSFORMER = UNET_ATTN + ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


# -- LoRA on the text encoder and UNet, through the adapter runtime (sdstudio/adapters) --------------------

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
    """A trainable LoRA (output times `scale`, Mix-of-Show's alpha) on each of `paths`; {kohya name: LoRA}."""
    from ..adapters import add_adapter, new_lora

    adapters = {p: new_lora(model.get_submodule(p), rank, scale * rank, init="kaiming") for p in paths}
    add_adapter(model, "edlora", adapters)
    return nn.ModuleDict({namer(p): a for p, a in adapters.items()})


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
    unet_targets: str = setting("attention", "UNet layers with LoRA: attention (q/k/v/out of every attention "
                                "layer: Mix-of-Show's choice, 128 modules on SD1.5) or transformer (also "
                                "feed-forward and the 1x1 proj convs: 192).", choices=("attention", "transformer"),
                                advanced=True)
    embedding_lr: float = setting(1e-3, "Learning rate of the layer-wise embeddings.", min=0.0, max=1.0)
    text_encoder_lr: float = setting(1e-5, "Learning rate of the text-encoder LoRA.", min=0.0, max=1.0)
    unet_lr: float = setting(1e-4, "Learning rate of the UNet LoRA.", min=0.0, max=1.0)
    emb_norm_threshold: float = setting(0.55, "Embeddings stop learning once their mean norm reaches this "
                                        "(0: never stop).", min=0.0, max=10.0, advanced=True)
    masked_loss: bool = setting(False, "Count the loss only inside subject masks: a white-on-black "
                                "<image>.mask.png beside each image.", advanced=True)
    clip_skip: int = setting(1, "Use the text encoder's n-th last layer.", min=1, max=4, advanced=True)
    attn_reg_weight: float = setting(0.01, "Attention regularisation (Mix-of-Show): keeps the concept words' "
                                     "cross-attention inside the subject mask, so a concept does not leak into "
                                     "others in multi-concept pictures. Needs <image>.mask.png files; 0: off.",
                                     min=0.0, max=10.0, advanced=True)
    attn_reg_full_identity: bool = setting(False, "Attention regularisation also pulls the second word's attention "
                                           "onto the whole mask (Mix-of-Show's reg_full_identity: for a concept "
                                           "whose clothes belong to it); off: it only keeps it out of the "
                                           "background.", advanced=True)

    @property
    def uses_masks(self) -> bool:
        """The dataset loads subject masks when this is true (masked loss or attention regularisation)."""
        return self.masked_loss or self.attn_reg_weight > 0


@register
class EDLoRA(MethodBase):
    name = "edlora"
    Config = EDLoRAConfig
    contract_settings = {"sample_prompts": '["a photo of <sks1> <sks2>"]'}
    # Mix-of-Show trains without gradient clipping (its AdamW step is never clipped).
    run_defaults = {"max_grad_norm": 0.0}
    # SDXL is refused on purpose: Mix-of-Show's layer-wise tokens are one per cross-attention layer of SD 1.x's 16,
    # and SDXL's 70 (1 to 10 transformer blocks per attention) have no published mapping, nor does its gradient
    # fusion or regional sampling exist for SDXL; inventing one would give files no other tool reads.
    unsupported_families = {"sdxl": "EDLoRA (Mix-of-Show) trains on SD 1.x/2.x bases only: pick an SD 1.5 base, or "
                                     "use pivotal tuning or LoRA for an SDXL character."}

    def check_settings(self, cfg) -> None:
        tk.check_tokens_before_loading(parse_tokens(options(cfg).concept_tokens))

    def prepare(self, c, cfg) -> list[ParamGroup]:
        o = options(cfg)
        self.cfg, self.o = cfg, o
        self.tokens = parse_tokens(o.concept_tokens)
        self.cross = cross_attention_layers(c.unet)
        self.layers = len(self.cross)
        # Attention regularisation records the concept words' attention maps: its processors do that.
        from .attention_reg import RecordContext, RecordingAttnProcessor

        self.rec = RecordContext() if o.attn_reg_weight > 0 else None
        self.proc_cls = RecordingAttnProcessor if self.rec is not None else LayerwiseAttnProcessor
        install_processors(c.unet, self.rec, self.proc_cls)
        # 1. Tokens: layers rows per concept token. The first is one random vector copied to every layer (as
        #    Mix-of-Show's '<rand-0.013>' initialiser), the second starts from the class word.
        gen = torch.Generator().manual_seed(int(getattr(cfg, "seed", 0)))
        te, tok = c.text_encoder, c.tokenizer
        for t in self.tokens:
            tk.check_new_token(tok, t)
        inits = [tk.init_rows(te, tok, 1, "", o.init_std, gen).expand(self.layers, -1),
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
        # Weight decay None: the run's weight_decay (0.01 by default) on every group, embeddings included, as
        # Mix-of-Show's one AdamW does.
        return [ParamGroup("embeddings", [self.emb.new], lr=o.embedding_lr, weight_decay=None),
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
        ensure_processors(c.unet, self.cross[0], self.rec, self.proc_cls)
        subject_mask = batch.mask
        if not self.o.masked_loss and batch.mask is not None:
            batch = dataclasses.replace(batch, cond={k: v for k, v in batch.cond.items() if k != "mask"})
        # The regularisation acts on the background only: without one (no mask files: all ones) it is zero, so
        # the step keeps the fast attention kernel.
        if self.rec is None or subject_mask is None or not bool((subject_mask < 0.5).any()):
            if self.rec is not None:
                self.rec.start(None)
            return denoising_loss(c, batch, self.cfg, encoder_hidden_states=self.encode(c, batch.captions))
        return self.loss_with_attention_reg(c, batch, subject_mask)

    def concept_positions(self, c, captions: list[str]) -> torch.Tensor:
        """(B, 2) positions of the two concept words in each caption's prompt (-1: cut off by the 77 limit)."""
        from .attention_reg import concept_positions

        first = [layer_prompts(self.prompt(x), self.table, self.layers)[0] for x in captions]
        ids = tk.tokenize(c.tokenizer, first, "cpu")
        return concept_positions(ids, tuple(tk.token_ids(c.tokenizer, [self.table[t][0] for t in self.tokens])))

    def loss_with_attention_reg(self, c, batch, subject_mask: torch.Tensor) -> torch.Tensor:
        """Denoising loss + Mix-of-Show's attention regularisation (methods/attention_reg.py)."""
        from ..train.noise import denoising_loss
        from .attention_reg import attention_reg_loss

        pos = self.concept_positions(c, batch.captions)
        valid = (pos >= 0).all(1)
        self.rec.start(pos.clamp(min=0))
        loss = denoising_loss(c, batch, self.cfg, encoder_hidden_states=self.encode(c, batch.captions))
        maps = self.rec.take()
        if not bool(valid.any()):
            return loss
        keep = valid.to(subject_mask.device)
        reg = attention_reg_loss([m[keep.to(m.device)] for m in maps], subject_mask[keep], self.o.attn_reg_weight,
                                 self.o.attn_reg_full_identity)
        return loss + reg.to(loss.device, loss.dtype)

    # Checkpoints: the embedding rows and the LoRAs, listed by their kohya names.
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
        lora = {}
        rows = self.rows().detach().float().cpu()
        embeddings = {t: rows[i * self.layers:(i + 1) * self.layers].clone() for i, t in enumerate(self.tokens)}
        for loras in (self.te_lora, self.unet_lora):
            for name, a in loras.items():
                lora.update({f"{name}.{k}": v.float().cpu() for k, v in a.state().items()})
        meta = {}
        if self.run is not None:
            from ..formats.metadata import training_metadata

            meta = training_metadata(self.run, c.family, network_dim=self.o.lora_rank,
                                     network_alpha=self.o.lora_alpha * self.o.lora_rank, kind="edlora",
                                     unet_lr=self.o.unet_lr, text_encoder_lr=self.o.text_encoder_lr,
                                     clip_skip=self.o.clip_skip)
        meta |= {"sdstudio.method": "edlora", "sdstudio.base_model": shareable(str(c.ref)), "sdstudio.family": c.family.name,
                "sdstudio.concept_tokens": " ".join(self.tokens), "sdstudio.class_word": self.o.class_word,
                "sdstudio.layers": str(self.layers), "sdstudio.clip_skip": str(self.o.clip_skip),
                "sdstudio.embedding_stopped_at": str(self.stopped_at)}
        return edlora_state_dict(embeddings, lora), meta

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

        from ..concepts.regions import generate

        img = generate(self.c, prompt, negative_prompt or "", [], steps=num_inference_steps, guidance=guidance_scale,
                       height=height, width=width, scheduler=self.scheduler, generator=generator,
                       output_type=output_type)
        return SimpleNamespace(images=[img])


# -- applying an EDLoRA file to loaded components (fusion, tests) --------------------------------------

_APPLIED = itertools.count(1)  # each applied concept's adapter name on the layers


class AppliedEDLoRA:
    """An EDLoRA concept live on Components: its tokens, its LoRA (adapter `name` on the models' layers, which
    `remove()` takes off) and the layer-wise processors."""

    def __init__(self, f: EDLoRAFile, name: str, layers: list):
        self.file, self.name, self.layers = f, name, layers

    def set_weight(self, weight: float) -> None:
        for layer in self.layers:
            layer.scales[self.name] = float(weight)
            layer.plan()

    def remove(self) -> None:
        for layer in self.layers:
            layer.remove(self.name)
        self.layers = []


def apply_edlora(c, path: Path | str | EDLoRAFile, weight: float = 1.0, ctx: AttnContext | None = None
                 ) -> AppliedEDLoRA:
    """Load an EDLoRA concept into `c` so prompts can use its tokens: adds the tokens (once), puts the LoRA on
    at `weight` and installs the layer-wise processors. `remove()` takes the LoRA off again."""
    from ..adapters import add_adapter
    from ..formats.lora import read_adapters

    f = path if isinstance(path, EDLoRAFile) else read_edlora(path)
    check_base(c, f)
    add_concept_tokens(c, f)
    install_processors(c.unet, ctx)
    flat = {f"{name}.{k}": v for name, g in f.lora.items() for k, v in g.items()}
    name = f"edlora{next(_APPLIED)}"
    layers = []
    if flat:
        weights = read_adapters(flat, {"unet": c.unet, "te0": c.text_encoder}, file_name=f.path.name)
        for mk, adapters in weights.targets.items():
            model = c.unet if mk == "unet" else c.text_encoder
            dtype = next(model.parameters()).dtype
            for a in adapters.values():
                a.to(dtype=dtype).requires_grad_(False)
            layers += add_adapter(model, name, adapters, scale=weight).values()
    return AppliedEDLoRA(f, name, layers)

