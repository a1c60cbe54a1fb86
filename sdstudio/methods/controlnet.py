"""ControlNet (Zhang et al. 2023): a trainable copy of the UNet's encoder learns to steer the frozen base from a
control image (edges, depth, pose...), through zero-initialised convolutions, so training starts exactly at the
base model and the base never changes.

Written like diffusers' examples/controlnet/train_controlnet.py: `ControlNetModel.from_unet` (or an existing
ControlNet to continue), the condition in [0, 1] beside the image in [-1, 1], uniform timesteps, the MSE
between the UNet's prediction (with the ControlNet's residuals added) and the eps or v target, AdamW at lr 1e-5
(its own default, as the script's README trains) with a constant schedule. Empty prompts, which teach the net to
read the image alone, are the shared `caption_dropout` (diffusers' --proportion_empty_prompts).

The dataset gives each image its control image as `batch.cond["control"]` (data/conditioning.py). Saved: a
diffusers folder (the Playground, `ControlNetModel.from_pretrained`) and one .safetensors in the original
layout (A1111's ControlNet extension, ComfyUI), both under the run's output name.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..fields import setting
from .base import Footprint, MethodBase, ParamGroup, register


@dataclass
class ControlNetConfig:
    """The [controlnet] table."""

    init: str = setting("", "Continue this ControlNet (a diffusers folder, or an original-layout .safetensors) "
                        "instead of starting from a copy of the base's encoder with zero convolutions.")
    single_file: bool = setting(True, "Also save one .safetensors in the original layout (A1111's ControlNet "
                                "extension, ComfyUI).", advanced=True)
    save_precision: str = setting("fp16", "Precision of the saved ControlNet.", choices=("fp16", "bf16", "fp32"),
                                  advanced=True)


def load_controlnet(path: Path, unet):
    """An existing ControlNet to continue: a diffusers folder or a single file in the original layout."""
    from diffusers import ControlNetModel

    from ..formats.controlnet import load_original_controlnet

    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"The ControlNet to continue, {path}, does not exist: fix controlnet.init, or leave it empty "
                        f"to start from the base model.")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path.name} has no config.json: point controlnet.init at a diffusers ControlNet folder "
                            f"or a .safetensors file.")
        model = ControlNetModel.from_pretrained(str(path), local_files_only=True)
    else:
        model = load_original_controlnet(path, unet)
    ucfg = unet.config
    if (model.config.cross_attention_dim != ucfg.cross_attention_dim
            or list(model.config.block_out_channels) != list(ucfg.block_out_channels)):
        raise UserError(f"{path.name} is a ControlNet for another model family than this base: pick one made for "
                        f"it, or leave controlnet.init empty.")
    return model


@functools.lru_cache(maxsize=4)
def controlnet_parameters(family_name: str) -> int:
    """Parameters of a ControlNet for the family's real UNet (built on the meta device: no memory)."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    from ..models.families import get_family

    with torch.device("meta"):
        unet = UNet2DConditionModel(**get_family(family_name).unet)
        return sum(p.numel() for p in ControlNetModel.from_unet(unet, load_weights_from_unet=False).parameters())


@register
class ControlNet(MethodBase):
    name = "controlnet"
    Config = ControlNetConfig
    conditioning = ("control",)  # every image needs its control image: batch.cond["control"], (B, 3, H, W) in [0, 1]
    run_defaults = {"learning_rate": 1e-5}

    # 1. What trains: the ControlNet alone (the UNet, VAE and text encoder stay frozen and bit-identical).
    def prepare(self, c, cfg) -> list[ParamGroup]:
        from diffusers import ControlNetModel

        self.cfg = cfg
        o: ControlNetConfig = cfg.options
        net = load_controlnet(Path(o.init), c.unet) if o.init else ControlNetModel.from_unet(c.unet)
        self.controlnet = net.to(device=c.unet.device).requires_grad_(True)  # the loop keeps trained weights fp32
        return [ParamGroup("controlnet", list(self.controlnet.parameters()), cfg.learning_rate)]

    def trainable_modules(self, c):
        return [("controlnet", self.controlnet)]

    # 2. What is minimised: the denoising loss of the frozen UNet plus the ControlNet's residuals, which it
    #    computes from the same noisy latents, timesteps and prompt.
    def loss(self, c, batch, step):
        from ..train.noise import denoising_loss

        control = batch.cond["control"]

        def residuals(x):
            down, mid = self.controlnet(x.latents, x.timesteps, encoder_hidden_states=x.encoder_hidden_states,
                                        controlnet_cond=control.to(x.dtype), return_dict=False,
                                        added_cond_kwargs=x.added_cond_kwargs)  # SDXL: text_embeds, time_ids
            return {"down_block_additional_residuals": [d.to(x.dtype) for d in down],
                    "mid_block_additional_residual": mid.to(x.dtype)}

        return denoising_loss(c, batch, self.cfg, unet_kwargs=residuals)

    # 3. What comes out: a diffusers folder and an original-layout single file.
    def save(self, c, out: Path) -> list[Path]:
        import torch

        from ..formats.controlnet import controlnet_to_original
        from ..formats.metadata import training_metadata
        from ..formats.safe_io import save_model_folder, save_safetensors

        o: ControlNetConfig = self.cfg.options
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[o.save_precision]
        outputs = [save_model_folder(self.controlnet, Path(out) / self.cfg.output_name, dtype)]
        if o.single_file:
            sd = {k: v.detach().to(dtype) for k, v in self.controlnet.state_dict().items()}
            meta = training_metadata(self.run, c.family, kind="controlnet")
            outputs.append(save_safetensors(controlnet_to_original(sd, self.controlnet.config),
                                            Path(out) / f"{self.cfg.output_name}.safetensors", meta))
        return outputs

    # Previews: the base pipeline with this very ControlNet (no copy); the loop passes each control image.
    def preview_pipeline(self, c):
        from diffusers import DPMSolverMultistepScheduler

        return controlnet_pipeline(c.pipeline(), self.controlnet,
                                   DPMSolverMultistepScheduler.from_config(c.scheduler.config))

    def load_output(self, pipe, paths: list[Path]):
        from diffusers import ControlNetModel

        folder = next(p for p in paths if Path(p).is_dir())
        return controlnet_pipeline(pipe, ControlNetModel.from_pretrained(str(folder), local_files_only=True))

    def footprint(self, cfg, arch, family):
        # The ControlNet is about half a UNet that trains fully; its activations come on top of the UNet's,
        # which the backward pass goes through to reach the residuals.
        return Footprint(trainable=controlnet_parameters(family.name), activations=1.5, time=1.6)


def controlnet_pipeline(pipe, controlnet, scheduler=None):
    """The ControlNet pipeline of `pipe`'s family (SD or SDXL) over `pipe`'s very modules and `controlnet`."""
    import diffusers

    parts = dict(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                 controlnet=controlnet, scheduler=scheduler or pipe.scheduler)
    if getattr(pipe, "text_encoder_2", None) is not None:
        return _quiet(diffusers.StableDiffusionXLControlNetPipeline(
            text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2, **parts))
    return _quiet(diffusers.StableDiffusionControlNetPipeline(safety_checker=None, feature_extractor=None,
                                                              requires_safety_checker=False, **parts))


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe
