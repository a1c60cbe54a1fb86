"""Full fine-tune: every UNet weight trains (the text encoder optionally) on a captioned dataset.

Saves what checkpoint users expect: a diffusers folder and an original-layout single-file .safetensors that
A1111, ComfyUI and `from_single_file` load. methods/dreambooth.py is this method plus class images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..fields import setting
from .base import TE2_LR_HELP, MethodBase, ParamGroup, register, text_encoder_groups


@dataclass
class FullConfig:
    """The [full] table."""

    train_text_encoder: bool = setting(False, "Also fine-tune the text encoder (more memory; at its own lr).")
    text_encoder_lr: float = setting(5e-6, "Learning rate of the text encoder.", min=0.0, max=1.0, advanced=True)
    text_encoder_2_lr: float = setting(0.0, TE2_LR_HELP, min=0.0, max=1.0, advanced=True)
    save_precision: str = setting("fp16", "Precision of the saved model.", choices=("fp16", "bf16", "fp32"),
                                  advanced=True)
    single_file: bool = setting(True, "Also save one .safetensors in the original (A1111/ComfyUI) layout.",
                                advanced=True)


def prepare_full(c, cfg, train_text_encoder: bool, text_encoder_lr: float,
                 text_encoder_2_lr: float = 0.0) -> list[ParamGroup]:
    c.unet.requires_grad_(True)
    groups = [ParamGroup("unet", list(c.unet.parameters()), cfg.learning_rate)]
    if train_text_encoder:
        for te in c.text_encoders:
            te.requires_grad_(True)
        groups += text_encoder_groups([list(te.parameters()) for te in c.text_encoders], text_encoder_lr,
                                      text_encoder_2_lr)
    return groups


def full_footprint(arch: dict, train_text_encoder: bool):
    """Every UNet weight trains (and the text encoder's, when asked)."""
    from .base import Footprint

    return Footprint(trainable=arch["unet"] + (arch["te"] if train_text_encoder else 0),
                     text_encoder_trains=train_text_encoder)


def save_full(c, cfg, run, out: Path, save_precision: str, single_file: bool, kind: str) -> list[Path]:
    """A diffusers folder <name>/ plus <name>.safetensors (original layout), both written atomically."""
    import torch

    from ..formats.ldm import pipeline_to_ldm
    from ..formats.metadata import training_metadata
    from ..formats.safe_io import atomic_dir, save_safetensors

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[save_precision]
    meta = training_metadata(run, c.family, kind=kind)
    folder = Path(out) / cfg.output_name
    with atomic_dir(folder) as tmp:
        pipe = c.pipeline()
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        # save_pretrained writes the live dtype; convert the weight files to the chosen precision.
        for f in tmp.rglob("*.safetensors"):
            from ..formats.safe_io import load_state_dict

            sd = load_state_dict(f)
            save_safetensors({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, f,
                             {"format": "pt"})
    outputs = [folder]
    if single_file and c.family.name in ("sd1", "sd2", "sdxl"):
        sd = pipeline_to_ldm(c.unet, c.vae, c.text_encoder, c.family.name,
                             text_encoder_2=c.text_encoders[1] if c.family.is_xl else None)
        outputs.append(save_safetensors({k: v.to(dtype) for k, v in sd.items()}, Path(out) /
                                        f"{cfg.output_name}.safetensors", meta))
    return outputs


@register
class Full(MethodBase):
    name = "full"
    Config = FullConfig

    def prepare(self, c, cfg) -> list[ParamGroup]:
        self.cfg = cfg
        o: FullConfig = cfg.options
        return prepare_full(c, cfg, o.train_text_encoder, o.text_encoder_lr, o.text_encoder_2_lr)

    def footprint(self, cfg, arch, family):
        return full_footprint(arch, cfg.options.train_text_encoder)

    def loss(self, c, batch, step):
        from ..train.noise import denoising_loss

        return denoising_loss(c, batch, self.cfg)

    def save(self, c, out: Path) -> list[Path]:
        o: FullConfig = self.cfg.options
        return save_full(c, self.cfg, self.run, out, o.save_precision, o.single_file, kind="checkpoint")
