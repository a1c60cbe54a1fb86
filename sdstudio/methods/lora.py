"""LoRA: the reference method. Read this first; write the next method like it.

A method is a small "setup" for the one loop (train/loop.py). It answers three questions:
  1. prepare: what trains? (attach adapters, freeze the rest, return parameter groups with their lrs)
  2. loss: what is minimised? (usually `denoising_loss`, shared by every diffusion method)
  3. save: what files come out? (what the Playground, A1111, ComfyUI and diffusers load)
Everything else (precision, accumulation, optimizers, caches, previews, checkpoints, stop/pause/resume, DDP)
is the loop's. Optional hooks with defaults are documented on `MethodBase` in methods/base.py.

DreamBooth-LoRA is this method with `prior_preservation = true` (a top-level setting: the dataset reads the
class images and `denoising_loss` weights them).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..fields import setting
from .base import TE2_LR_HELP, MethodBase, ParamGroup, register, text_encoder_groups

# Which UNet modules get a LoRA, by name suffix (SD 1.x/2.x/XL share them).
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
MLP = ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")  # kohya's default LoRA also covers proj_in/out
CONVS = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
TE_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
TE_MLP = ("fc1", "fc2")
TARGETS = ("attention", "attention_mlp", "locon")


@dataclass
class LoraConfig:
    """The [lora] table."""

    rank: int = setting(16, "LoRA rank (network dim): capacity and file size.", min=1, max=1024)
    alpha: float = setting(16.0, "LoRA alpha: the update is scaled by alpha/rank.", min=0.0, max=4096.0)
    targets: str = setting("attention_mlp", "Which layers learn: attention, attention_mlp (kohya's default), or "
                           "locon (+ convolutions).", choices=TARGETS)
    conv_rank: int = setting(8, "Rank of the convolution LoRAs (locon only).", min=1, max=1024, advanced=True)
    conv_alpha: float = setting(4.0, "Alpha of the convolution LoRAs (locon only).", min=0.0, max=4096.0,
                                advanced=True)
    train_text_encoder: bool = setting(False, "Also train a LoRA on the text encoder (at its own lr).")
    text_encoder_lr: float = setting(5e-5, "Learning rate of the text-encoder LoRA.", min=0.0, max=10.0,
                                     advanced=True)
    text_encoder_2_lr: float = setting(0.0, TE2_LR_HELP, min=0.0, max=10.0, advanced=True)
    dropout: float = setting(0.0, "LoRA dropout.", min=0.0, max=0.9, advanced=True)
    save_format: str = setting("kohya", "File format: kohya (A1111/ComfyUI/diffusers) or diffusers (peft keys).",
                               choices=("kohya", "diffusers"), advanced=True)
    save_precision: str = setting("fp16", "Precision of the saved file.", choices=("fp16", "bf16", "fp32"),
                                  advanced=True)


def unet_target_names(unet, targets: str) -> tuple[list[str], list[str]]:
    """(linear/1x1 module paths, 3x3-conv module paths) that get a LoRA for this target preset."""
    import torch

    suffixes = ATTENTION + (MLP if targets in ("attention_mlp", "locon") else ()) + (
        CONVS if targets == "locon" else ())
    linear, conv = [], []
    for path, mod in unet.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) or not path.endswith(suffixes):
            continue
        if any(path.endswith(s) for s in ATTENTION + MLP) and ("attentions" in path or "transformer" in path):
            linear.append(path)
        elif targets == "locon" and any(path.endswith(s) for s in CONVS) and ("resnets" in path or "samplers" in path):
            (conv if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size != (1, 1) else linear).append(path)
    return linear, conv


def te_target_names(te, targets: str) -> list[str]:
    """Text-encoder Linear module paths that get a LoRA: attention (q/k/v/out) and, unless `targets` is
    "attention", the MLP (fc1/fc2)."""
    import torch

    suffixes = TE_ATTENTION + (TE_MLP if targets != "attention" else ())
    return [path for path, mod in te.named_modules()
            if isinstance(mod, torch.nn.Linear) and path.rsplit(".", 1)[-1] in suffixes]


def attach_adapters(model, paths: list[str], make) -> list:
    """Put a new trainable adapter, `make(module, path)`, on each of `paths` in `model` (through the one
    adapter runtime, sdstudio/adapters) and return its parameters. The base stays frozen."""
    from ..adapters import add_adapter

    adapters = {p: make(model.get_submodule(p), p) for p in paths}
    add_adapter(model, "default", adapters)
    return [p for a in adapters.values() for p in a.parameters()]


@register
class Lora(MethodBase):
    name = "lora"
    Config = LoraConfig

    # 1. What trains: a LoRA on the chosen UNet layers (and optionally the text encoder); the base stays frozen.
    def prepare(self, c, cfg) -> list[ParamGroup]:
        from ..adapters import new_lora

        o: LoraConfig = cfg.options
        self.cfg = cfg
        linear, conv = unet_target_names(c.unet, o.targets)
        convs = set(conv)  # 3x3 convolutions get their own rank and alpha

        def make(mod, path):
            if path in convs:
                return new_lora(mod, o.conv_rank, o.conv_alpha, dropout=o.dropout)
            return new_lora(mod, o.rank, o.alpha, dropout=o.dropout)

        groups = [ParamGroup("unet", attach_adapters(c.unet, linear + conv, make), cfg.learning_rate)]
        if o.train_text_encoder:  # each text encoder its own group (SDXL's second at text_encoder_2_lr)
            params = [attach_adapters(te, te_target_names(te, o.targets),
                                      lambda mod, path: new_lora(mod, o.rank, o.alpha, dropout=o.dropout))
                      for te in c.text_encoders]
            groups += text_encoder_groups(params, o.text_encoder_lr, o.text_encoder_2_lr)
        return groups

    # For the VRAM/time estimate: the LoRA on the UNet, and on the text encoder when it trains.
    def footprint(self, cfg, arch, family):
        from .base import Footprint

        te = cfg.options.train_text_encoder
        return Footprint(trainable=arch["unet_lora"] + (arch["te_lora"] if te else 0), text_encoder_trains=te)

    # 2. What is minimised: the standard denoising loss (min-SNR, v-pred, prior preservation all inside).
    def loss(self, c, batch, step):
        from ..train.noise import denoising_loss

        return denoising_loss(c, batch, self.cfg)

    # 3. What comes out: one .safetensors in kohya (default) or diffusers format, with ss_* metadata.
    def save(self, c, out: Path) -> list[Path]:
        import torch

        from ..formats.lora import save_diffusers_lora, save_kohya_lora
        from ..formats.metadata import training_metadata

        o: LoraConfig = self.cfg.options
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[o.save_precision]
        # sd-scripts' networks.lora takes LoCon's conv layers as network args (strings, as its CLI passes them);
        # "algo" is LyCORIS's key, not networks.lora's. Which layers trained is ours to note.
        args = {"conv_dim": str(o.conv_rank), "conv_alpha": str(o.conv_alpha)} if o.targets == "locon" else None
        meta = training_metadata(self.run, c.family, network_dim=o.rank, network_alpha=o.alpha,
                                 network_module="networks.lora", network_args=args, kind="lora",
                                 unet_lr=self.cfg.learning_rate,
                                 text_encoder_lr=o.text_encoder_lr if o.train_text_encoder else None,
                                 network_dropout=o.dropout)
        meta["sdstudio.targets"] = o.targets
        tes = c.text_encoders if o.train_text_encoder else []
        path = Path(out) / f"{self.cfg.output_name}.safetensors"
        if o.save_format == "diffusers":
            return [save_diffusers_lora(path, c.unet, tes, meta, dtype)]
        return [save_kohya_lora(path, c.unet, tes, meta, dtype, xl=c.family.is_xl)]
