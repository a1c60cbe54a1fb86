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
from .base import MethodBase, ParamGroup, register

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


def lean_lora_forward(model) -> int:
    """Give each peft LoRA Linear in `model` a leaner forward for training; returns how many it changed.

    peft's `Linear.forward` serves every case (several adapters, mixed batches, merges, DoRA, dtype casts),
    and on small layers its Python costs as much as the maths. A training run has one unmerged vanilla
    adapter, so this forward is base(x) + scale * B(A(dropout(x))) in three ops. The maths is the same, and
    so are the parameters, names and files. In every other case (adapters disabled, merged, another adapter
    set active, extra arguments, DoRA) it hands over to peft's own forward.
    """
    import types

    import torch
    import torch.nn.functional as F
    from peft.tuners.lora.layer import Linear as PeftLinear

    def forward(self, x, *args, **kwargs):
        if (args or kwargs or self._disable_adapters or self.merged_adapters
                or self._active_adapter != self._lean_active):
            return PeftLinear.forward(self, x, *args, **kwargs)
        name = self._lean_name
        base = self.base_layer
        out = F.linear(x, base.weight, base.bias)
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        h = F.linear(F.linear(self.lora_dropout[name](x.to(a.dtype)), a), b)
        return torch.add(out, h.to(out.dtype), alpha=self.scaling[name])

    changed = 0
    for mod in model.modules():
        if type(mod) is not PeftLinear or len(mod.lora_A) != 1 or mod.lora_variant or mod.fan_in_fan_out:
            continue
        if not isinstance(mod.base_layer, torch.nn.Linear):
            continue
        mod._lean_name = next(iter(mod.lora_A))
        mod._lean_active = mod._active_adapter
        mod.forward = types.MethodType(forward, mod)
        changed += 1
    return changed


@register
class Lora(MethodBase):
    name = "lora"
    Config = LoraConfig

    # 1. What trains: a LoRA on the chosen UNet layers (and optionally the text encoder); the base stays frozen.
    def prepare(self, c, cfg) -> list[ParamGroup]:
        from peft import LoraConfig as PeftLoraConfig

        o: LoraConfig = cfg.options
        self.cfg = cfg
        linear, conv = unet_target_names(c.unet, o.targets)
        # Full module paths as targets; convs get their own rank/alpha through peft's patterns.
        patterns_r = {p: o.conv_rank for p in conv}
        patterns_a = {p: o.conv_alpha for p in conv}
        c.unet.add_adapter(PeftLoraConfig(r=o.rank, lora_alpha=o.alpha, lora_dropout=o.dropout,
                                          init_lora_weights="gaussian", target_modules=linear + conv,
                                          rank_pattern=patterns_r, alpha_pattern=patterns_a))
        lean_lora_forward(c.unet)
        groups = [ParamGroup("unet", [p for p in c.unet.parameters() if p.requires_grad], cfg.learning_rate)]
        if o.train_text_encoder:
            te_targets = list(TE_ATTENTION + (TE_MLP if o.targets != "attention" else ()))
            for te in c.text_encoders:
                te.add_adapter(PeftLoraConfig(r=o.rank, lora_alpha=o.alpha, lora_dropout=o.dropout,
                                              init_lora_weights="gaussian", target_modules=te_targets))
                lean_lora_forward(te)
            groups.append(ParamGroup("text_encoder", [p for te in c.text_encoders for p in te.parameters()
                                                      if p.requires_grad], o.text_encoder_lr))
        return groups

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
