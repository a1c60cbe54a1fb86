"""DreamBooth (Ruiz et al. 2022): the full UNet (text encoder optional) learns a subject from a few images,
while prior preservation on class images ("a photo of a person") keeps the class intact.

Prior preservation is the top-level `prior_preservation` setting (on in the DreamBooth presets): the dataset
reads the class images and `denoising_loss` weighs their loss by `prior_loss_weight`. DreamBooth-LoRA is
the `lora` method with the same setting.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..fields import setting
from .base import TE2_LR_HELP, MethodBase, ParamGroup, register
from .full import full_footprint, prepare_full, save_full


@dataclass
class DreamBoothConfig:
    """The [dreambooth] table."""

    train_text_encoder: bool = setting(False, "Also fine-tune the text encoder (better likeness, more memory).")
    text_encoder_lr: float = setting(2e-6, "Learning rate of the text encoder.", min=0.0, max=1.0, advanced=True)
    text_encoder_2_lr: float = setting(0.0, TE2_LR_HELP, min=0.0, max=1.0, advanced=True)
    save_precision: str = setting("fp16", "Precision of the saved model.", choices=("fp16", "bf16", "fp32"),
                                  advanced=True)
    single_file: bool = setting(True, "Also save one .safetensors in the original (A1111/ComfyUI) layout.",
                                advanced=True)


@register
class DreamBooth(MethodBase):
    name = "dreambooth"
    Config = DreamBoothConfig

    def prepare(self, c, cfg) -> list[ParamGroup]:
        self.cfg = cfg
        o: DreamBoothConfig = cfg.options
        return prepare_full(c, cfg, o.train_text_encoder, o.text_encoder_lr, o.text_encoder_2_lr)

    def footprint(self, cfg, arch, family):
        return full_footprint(arch, cfg.options.train_text_encoder)

    def loss(self, c, batch, step):
        from ..train.noise import denoising_loss

        return denoising_loss(c, batch, self.cfg)  # class images weighted by prior_loss_weight inside

    def save(self, c, out: Path) -> list[Path]:
        o: DreamBoothConfig = self.cfg.options
        return save_full(c, self.cfg, self.run, out, o.save_precision, o.single_file, kind="checkpoint")
