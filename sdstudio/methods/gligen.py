"""GLIGEN grounding (Li et al. 2023): the UNet's gated self-attention layers ("fusers") and the text-box position
net learn to put a phrase where its box is, from images with boxes. Everything else stays frozen, bit for bit.

Written like diffusers' examples/research_projects/gligen/train_gligen_text.py: only parameters under `fuser` and
`position_net` train, each object is its phrase's pooled text feature (the end token's, before the projection)
with its (x0, y0, x1, y1) box as fractions of the sample, 30 slots with a mask, passed to the UNet as
`cross_attention_kwargs={"gligen": {...}}`, the eps or v MSE, AdamW at lr 5e-6 with a constant schedule and
gradient clipping at 1. As there, half of the captions are dropped (the shared `caption_dropout`, 0.5 by default
here), so the layers learn to place an object from its phrase alone, and all of an image's boxes are dropped 10%
of the time (`box_dropout`), so the model stays good without boxes.

Where the gated layers come from (the first that applies):
1. `module`: a GLIGEN module file (the released / ComfyUI layout, e.g. models/gligen/
   gligen_sd14_textbox_pruned.safetensors) put on the base as the Playground does, to fine-tune it;
2. the base's own: a full GLIGEN checkpoint (a diffusers folder with a gated UNet, such as
   masterful/gligen-1-4-generation-text-box, or an original-layout single file);
3. `new_layers = true`: new layers with their gates at zero, the paper's start (the output is the base's
   exactly until they learn). Grounding from nothing needs a large boxed dataset (GLIGEN trained on millions).
A base with none of these is refused before anything loads.

The dataset gives each image its boxes (data/boxes.py: `boxes.jsonl`, the Dataset tab's box editor) cut with its
crop and flip, as `batch.cond["boxes"]`. Saved: one module file in the layout ComfyUI's GLIGEN loader reads
(formats/gligen.py), which the Playground lists under models/gligen/ and applies to a plain base.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..fields import setting
from .base import Footprint, MethodBase, ParamGroup, register


@dataclass
class GligenConfig:
    """The [gligen] table."""

    module: str = setting("", "A GLIGEN module file to fine-tune (a path, or a name in models/gligen/), put on the "
                          "base as the Playground does. Empty: the base's own gated layers (a GLIGEN checkpoint).")
    new_layers: bool = setting(False, "When the base has no GLIGEN layers and no module is given, start new ones "
                               "with closed gates (the paper's start). Needs a large boxed dataset and a higher "
                               "learning rate (the paper's 5e-5).")
    box_dropout: float = setting(0.1, "Share of images trained without their boxes, so the model stays good "
                                 "without them (diffusers' recipe: 0.1).", min=0.0, max=1.0, advanced=True)
    save_precision: str = setting("fp16", "Precision of the saved module file.", choices=("fp16", "bf16", "fp32"),
                                  advanced=True)


def gated_parameter(name: str) -> bool:
    """A UNet parameter that belongs to GLIGEN (a fuser or the position net)."""
    return name.startswith("position_net.") or ".fuser." in name


@functools.lru_cache(maxsize=4)
def gligen_parameters(family_name: str) -> int:
    """Parameters of the gated layers of the family's real UNet (built on the meta device: no memory)."""
    import torch
    from diffusers import UNet2DConditionModel

    from ..models.families import get_family

    with torch.device("meta"):
        unet = UNet2DConditionModel(**dict(get_family(family_name).unet, attention_type="gated"))
    return sum(p.numel() for n, p in unet.named_parameters() if gated_parameter(n))


def new_module(unet) -> dict:
    """New GLIGEN layers for `unet`, in the module-file layout: a fuser per transformer block and a text-box position
    net, with diffusers' own initialisation (gates at zero, so the UNet's output does not change)."""
    from diffusers.models.attention import BasicTransformerBlock, GatedSelfAttentionDense
    from diffusers.models.embeddings import GLIGENTextBoundingboxProjection

    from ..formats.gligen import unet_to_module

    ctx = unet.config.cross_attention_dim
    ctx = ctx[0] if isinstance(ctx, (list, tuple)) else ctx
    sd = {}
    for path, block in unet.named_modules():
        if isinstance(block, BasicTransformerBlock):
            dim, heads = block.attn1.to_q.in_features, block.attn1.heads
            fuser = GatedSelfAttentionDense(dim, ctx, heads, dim // heads)
            sd.update({f"{path}.fuser.{k}": v for k, v in fuser.state_dict().items()})
    net = GLIGENTextBoundingboxProjection(positive_len=ctx, out_dim=ctx, feature_type="text-only")
    sd.update({f"position_net.{k}": v for k, v in net.state_dict().items()})
    return unet_to_module(sd, unet.config)


def module_path(text: str) -> Path:
    """The module file `text` names: a path (the workspace first, then the current folder) or a name in
    models/gligen/ (and the --models-from folders)."""
    from ..models.refs import Places

    try:
        ref = Places.cli().model(text, kind="gligen")
    except UserError:
        ref = None
    if ref is None or ref.path is None or not Path(ref.path).is_file():
        raise UserError(f"The GLIGEN module {text} does not exist (looked in the workspace, the current folder and "
                        f"models/gligen/): fix gligen.module, or leave it empty to train the base's own layers.")
    return Path(ref.path)


def base_has_gated_layers(ref: str) -> bool | None:
    """Whether a base model carries GLIGEN layers, read from its files (no model loads); None when it cannot be
    told yet (a hub id not downloaded)."""
    import json

    from ..formats.gligen import checkpoint_has_gligen
    from ..models.refs import Places

    if str(ref).strip() in ("tiny", "tiny-sdxl"):
        return False
    try:
        mref = Places.cli().model(ref)
    except UserError:
        return None  # the preflight's own check of the base says what is wrong with it
    if mref.kind != "path" or mref.path is None:
        return None
    path = Path(mref.path)
    if path.is_dir():
        cfg = path / "unet" / "config.json"
        if not cfg.is_file():
            return None
        return json.loads(cfg.read_text(encoding="utf-8")).get("attention_type") == "gated"
    return checkpoint_has_gligen(path)


def dataset_phrases(dataset: str) -> list[str]:
    """Every phrase of the dataset's boxes.jsonl ([] when it has none: the dataset check says so)."""
    from ..data.boxes import boxes_file, read_boxes

    path = boxes_file(Path(dataset).expanduser()) if Path(dataset).expanduser().is_dir() else None
    if path is None:
        return []
    return sorted({o.phrase for objs in read_boxes(path).values() for o in objs})


def phrase_tokenizer(ref: str):
    """The base's tokenizer when it is on disk, else the built-in CLIP tokenizer (SD 1.x and 2.x bases use the
    same BPE), for counting phrase tokens before any model loads."""
    from transformers import CLIPTokenizer

    from ..models.refs import Places

    try:
        mref = Places.cli().model(ref)
        folder = Path(mref.path) / "tokenizer" if mref.kind == "path" and mref.path else None
    except UserError:
        folder = None
    if folder is None or not folder.is_dir():
        from ..models.tiny import tiny_model_dir

        folder = tiny_model_dir() / "tokenizer"
    return CLIPTokenizer.from_pretrained(str(folder))


@register
class Gligen(MethodBase):
    name = "gligen"
    Config = GligenConfig
    conditioning = ("boxes",)  # batch.cond["boxes"]: per item {"boxes": (30, 4), "masks": (30,), "phrases": [...]}
    run_defaults = {"learning_rate": 5e-6, "caption_dropout": 0.5}
    contract_settings = {"gligen.new_layers": "true"}  # the tiny base has no GLIGEN layers
    # GLIGEN exists for SD 1.x (the released gligen-1-4 models, ComfyUI's module files); nobody has published
    # SDXL gated layers, and the Playground's GLIGEN runs on SD 1.x.
    unsupported_families = {"sdxl": "GLIGEN trains on SD 1.x bases only (its released models and module files are "
                                    "SD 1.4/1.5): pick an SD 1.5 base."}

    # 0. Before anything loads: where the gated layers come from, and every phrase fits the text encoder.
    def check_settings(self, cfg) -> None:
        from ..playground.gligen import check_phrase

        o: GligenConfig = cfg.options
        if o.module.strip():
            module_path(o.module)
        elif not o.new_layers and base_has_gated_layers(cfg.base_model) is False:
            raise UserError(f"The base {Path(str(cfg.base_model)).name} has no GLIGEN layers to train: set "
                            f"gligen.module to a GLIGEN module file (models/gligen/), pick a GLIGEN checkpoint as the "
                            f"base, or set gligen.new_layers = true to start new ones.")
        phrases = dataset_phrases(cfg.dataset)
        if phrases:
            tok = phrase_tokenizer(cfg.base_model)
            for phrase in phrases:
                check_phrase(tok, phrase)

    # 1. What trains: the fusers and the position net; the UNet around them, the VAE and the text encoder are frozen.
    def prepare(self, c, cfg) -> list[ParamGroup]:
        from ..formats.gligen import read_module
        from ..playground.gligen import attach_module, base_module, has_gated_layers

        self.cfg, self.phrases = cfg, {}
        o: GligenConfig = cfg.options
        if o.module.strip():
            path = module_path(o.module)
            attach_module(c.unet, read_module(path)[0], path.name)
        elif not has_gated_layers(c.unet):
            own = base_module(c)  # an original-layout GLIGEN checkpoint: its GLIGEN part, from the same file
            if own is not None:
                attach_module(c.unet, read_module(own)[0], own.name)
            elif o.new_layers:
                attach_module(c.unet, new_module(c.unet), "new GLIGEN layers")
            else:
                raise UserError(f"The base {Path(str(cfg.base_model)).name} has no GLIGEN layers to train: set "
                                f"gligen.module to a GLIGEN module file, pick a GLIGEN checkpoint as the base, or set "
                                f"gligen.new_layers = true to start new ones.")
        params = [p for n, p in c.unet.named_parameters() if gated_parameter(n)]
        for p in params:
            p.requires_grad_(True)  # the loop keeps trained weights in fp32
        return [ParamGroup("gligen", params, cfg.learning_rate)]

    def trainable_modules(self, c):
        # The gated layers live inside the UNet; only their parameters have requires_grad, so a checkpoint holds
        # exactly them (under "unet.").
        return [("unet", c.unet)]

    # 2. What is minimised: the denoising loss with each image's objects in the fusers.
    def loss(self, c, batch, step):
        import torch

        from ..train.noise import denoising_loss

        o: GligenConfig = self.cfg.options
        items = batch.cond["boxes"]
        device, dtype = c.unet.device, c.dtype
        boxes = torch.stack([it["boxes"] for it in items]).to(device)
        masks = torch.stack([it["masks"] for it in items]).to(device)
        if o.box_dropout > 0:  # drawn from the batch's generator: a resumed run drops the same images
            gen = batch.generator
            u = torch.rand(len(items), generator=gen, device=gen.device if gen is not None else device)
            masks = masks * (u >= o.box_dropout).to(device, masks.dtype)[:, None]
        gligen = {"boxes": boxes.to(dtype), "positive_embeddings": self.phrase_features(c, items).to(dtype),
                  "masks": masks.to(dtype)}
        return denoising_loss(c, batch, self.cfg, unet_kwargs={"cross_attention_kwargs": {"gligen": gligen}})

    def phrase_features(self, c, items):
        """(B, 30, dim): each slot's phrase feature (zeros for empty slots), each phrase encoded once per run."""
        import torch

        from ..playground.gligen import encode_phrases

        new = sorted({p for it in items for p in it["phrases"]} - set(self.phrases))
        if new:
            with torch.no_grad():
                feats = encode_phrases(c.tokenizer, c.text_encoder, new).float()
            self.phrases.update(zip(new, feats))
        dim = c.unet.position_net.positive_len
        out = torch.zeros(len(items), items[0]["boxes"].shape[0], dim, device=c.unet.device)
        for i, it in enumerate(items):
            for j, phrase in enumerate(it["phrases"]):
                out[i, j] = self.phrases[phrase]
        return out

    # 3. What comes out: the module file (ComfyUI's GLIGEN layout), for the Playground and ComfyUI.
    def save(self, c, out: Path) -> list[Path]:
        import torch

        from ..formats.gligen import save_module
        from ..formats.metadata import training_metadata

        o: GligenConfig = self.cfg.options
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[o.save_precision]
        meta = training_metadata(self.run, c.family, kind="gligen")  # modelspec.architecture ".../gligen"
        return [save_module(c.unet, Path(out) / f"{self.cfg.output_name}.safetensors", meta, dtype)]

    # Previews: the base with the layers being trained, grounded with the dataset's first boxed image's objects.
    def preview_pipeline(self, c):
        from diffusers import DPMSolverMultistepScheduler

        phrases, boxes = preview_objects(self.run.layout if self.run else None)
        if not phrases:
            return MethodBase.preview_pipeline(self, c)
        return _grounded(_gligen_pipeline(c.vae, c.text_encoder, c.tokenizer, c.unet,
                                          DPMSolverMultistepScheduler.from_config(c.scheduler.config)), phrases, boxes)

    def load_output(self, pipe, paths: list[Path]):
        """As a diffusers user would: the module on the base's UNet, in diffusers' GLIGEN pipeline (called with
        `gligen_phrases` and `gligen_boxes`)."""
        from ..formats.gligen import read_module
        from ..playground.gligen import attach_module

        path = Path(paths[0])
        attach_module(pipe.unet, read_module(path)[0], path.name)
        return _gligen_pipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, pipe.scheduler)

    def footprint(self, cfg, arch, family):
        # The fusers sit in every transformer block, so the backward pass goes through the whole UNet (as a LoRA's
        # does) plus one more self-attention per block over the visual and grounding tokens.
        return Footprint(trainable=gligen_parameters(family.name), activations=1.3, time=1.3)


def preview_objects(layout) -> tuple[list[str], list[list[float]]]:
    """(phrases, boxes) of the dataset's first image (in file-name order) that has objects."""
    from ..data.boxes import boxes_file, read_boxes

    path = boxes_file(layout.root) if layout is not None else None
    table = read_boxes(path) if path is not None else {}
    for name in sorted(table):
        if table[name]:
            return [o.phrase for o in table[name]], [list(o.box) for o in table[name]]
    return [], []


def _gligen_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    import warnings

    with warnings.catch_warnings():  # diffusers keeps its GLIGEN pipeline under "deprecated"
        warnings.simplefilter("ignore")
        from diffusers import StableDiffusionGLIGENPipeline

        pipe = StableDiffusionGLIGENPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _grounded:
    """A GLIGEN pipeline called like a plain one: every call grounds the given objects on all steps (a fraction
    under 1 would leave diffusers' pipeline with its fusers switched off, and so the training after it)."""

    def __init__(self, pipe, phrases: list[str], boxes: list[list[float]]) -> None:
        self.pipe, self.phrases, self.boxes = pipe, phrases, boxes

    def __call__(self, prompt, **kw):
        return self.pipe(prompt, gligen_phrases=self.phrases, gligen_boxes=self.boxes,
                         gligen_scheduled_sampling_beta=1.0, **kw)

    def __getattr__(self, name):
        return getattr(self.pipe, name)
