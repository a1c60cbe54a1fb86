"""T2I-Adapter (Mou et al. 2023): a small network turns a control image (a sketch, edges, depth...) into features
that are added inside the frozen UNet's encoder. Computed once per image, not once per step, so it costs almost
nothing at generation time, and it stacks with ControlNets and LoRAs.

Full adapters (~77M parameters on SD 1.5, like TencentARC's sketch/canny/depth adapters) and light ones (a few
million, like the colour adapter) for SD 1.x and 2.x; an SDXL base gets the XL adapter (TencentARC's
t2i-adapter-*-sdxl layout). Trained like diffusers' train_t2i_adapter_sdxl.py (diffusers has no SD 1.x script):
cubic timestep sampling, which favours the noisy steps where an image's structure is decided, AdamW, MSE on the
eps or v target. The condition comes as `batch.cond["control"]`; a grey (sketch) adapter reads its mean channel,
as the Playground feeds it. Saved as a diffusers folder (`T2IAdapter.from_pretrained`, our Playground).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..fields import setting
from .base import Footprint, MethodBase, ParamGroup, register

ADAPTER_TYPES = ("full", "light")


@dataclass
class T2IAdapterConfig:
    """The [t2i_adapter] table."""

    adapter_type: str = setting("full", "full (the official sketch/canny/depth adapters' size) or light (a few "
                                "million parameters, like the colour adapter; SD 1.x/2.x only).", choices=ADAPTER_TYPES)
    grey: bool = setting(False, "Read the control image as one grey channel (sketch adapters, like TencentARC's "
                         "t2iadapter_sketch).")
    timestep_sampling: str = setting("cubic", "cubic (more noisy steps, as the T2I-Adapter paper and diffusers' "
                                     "script) or uniform.", choices=("cubic", "uniform"), advanced=True)
    init: str = setting("", "Continue this T2I-Adapter (a diffusers folder) instead of a new one.", advanced=True)
    save_precision: str = setting("fp16", "Precision of the saved adapter.", choices=("fp16", "bf16", "fp32"),
                                  advanced=True)


def adapter_config(unet_config, xl: bool, adapter_type: str = "full", grey: bool = False) -> dict:
    """T2IAdapter settings whose features fit this UNet: one per down block (and the mid block on SDXL), each
    with the block's width and resolution."""
    widths = list(unet_config.block_out_channels)
    channels = 1 if grey else 3
    if xl:
        if adapter_type != "full":
            raise UserError("SDXL has no light T2I-Adapter: use adapter_type = full.")
        # SDXL: 3 down blocks; the 4th feature goes to the mid block (diffusers' FullAdapterXL, 16x pixel unshuffle)
        return dict(in_channels=channels, channels=widths + [widths[-1]] * (4 - len(widths)), num_res_blocks=2,
                    downscale_factor=16, adapter_type="full_adapter_xl")
    if adapter_type == "light":  # one block per width, then one more at the last width
        return dict(in_channels=channels, channels=widths[:-1], num_res_blocks=4, downscale_factor=8,
                    adapter_type="light_adapter")
    return dict(in_channels=channels, channels=widths, num_res_blocks=2, downscale_factor=8,
                adapter_type="full_adapter")


@functools.lru_cache(maxsize=8)
def adapter_parameters(family_name: str, adapter_type: str, grey: bool) -> int:
    """Parameters of the adapter for the family's real UNet (meta device: no memory)."""
    import torch
    from diffusers import T2IAdapter

    from ..models.families import get_family

    fam = get_family(family_name)

    class _Cfg:
        block_out_channels = fam.unet["block_out_channels"]

    with torch.device("meta"):
        model = T2IAdapter(**adapter_config(_Cfg, fam.is_xl, adapter_type if not fam.is_xl else "full", grey))
    return sum(p.numel() for p in model.parameters())


@register
class T2IAdapterMethod(MethodBase):
    name = "t2i_adapter"
    Config = T2IAdapterConfig
    conditioning = ("control",)
    run_defaults = {"learning_rate": 1e-5}  # the T2I-Adapter paper's and diffusers' SDXL adapter examples'

    # 1. What trains: the adapter alone; the base stays frozen.
    def prepare(self, c, cfg) -> list[ParamGroup]:
        from diffusers import T2IAdapter

        self.cfg = cfg
        o: T2IAdapterConfig = cfg.options
        if o.init:
            path = Path(o.init).expanduser()
            if not (path / "config.json").is_file():
                raise UserError(f"{path} is not a diffusers T2I-Adapter folder (no config.json): fix t2i_adapter.init, "
                                f"or leave it empty to train a new adapter.")
            adapter = T2IAdapter.from_pretrained(str(path), local_files_only=True)
        else:
            adapter = T2IAdapter(**adapter_config(c.unet.config, c.family.is_xl, o.adapter_type, o.grey))
        widths, ch = list(c.unet.config.block_out_channels), list(adapter.config.channels)
        if ch[:len(widths)] != widths[:len(ch)]:  # (SDXL's 4th feature, for the mid block, repeats the last width)
            raise UserError(f"The T2I-Adapter's widths {list(adapter.config.channels)} do not fit this base "
                            f"({widths}): continue an adapter made for this model family, or start a new one.")
        self.adapter = adapter.to(device=c.unet.device).requires_grad_(True)  # the loop keeps trained weights fp32
        return [ParamGroup("adapter", list(self.adapter.parameters()), cfg.learning_rate)]

    def trainable_modules(self, c):
        return [("adapter", self.adapter)]

    # 2. What is minimised: the denoising loss with the adapter's features added in the UNet's encoder, at
    #    cubic-sampled timesteps.
    def loss(self, c, batch, step):
        from ..train.noise import cubic_timesteps, denoising_loss, sample_timesteps

        control = batch.cond["control"]
        if self.adapter.config.in_channels == 1:
            control = control.mean(dim=1, keepdim=True)
        features = self.adapter(control)
        sampler = cubic_timesteps if self.cfg.options.timestep_sampling == "cubic" else sample_timesteps
        # A fresh list per call: the UNet pops the features as it uses them.
        return denoising_loss(c, batch, self.cfg, timesteps=sampler, unet_kwargs=lambda x: {
            "down_intrablock_additional_residuals": [f.to(x.dtype) for f in features]})

    # 3. What comes out: a diffusers folder.
    def save(self, c, out: Path) -> list[Path]:
        import torch

        from ..formats.safe_io import save_model_folder

        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.cfg.options.save_precision]
        return [save_model_folder(self.adapter, Path(out) / self.cfg.output_name, dtype)]

    def preview_pipeline(self, c):
        from diffusers import DPMSolverMultistepScheduler

        return adapter_pipeline(c.pipeline(), self.adapter, DPMSolverMultistepScheduler.from_config(c.scheduler.config))

    def load_output(self, pipe, paths: list[Path]):
        from diffusers import T2IAdapter

        return adapter_pipeline(pipe, T2IAdapter.from_pretrained(str(paths[0]), local_files_only=True))

    def footprint(self, cfg, arch, family):
        o = cfg.options
        # The adapter is small; the backward pass still goes through the UNet's encoder to reach it.
        return Footprint(trainable=adapter_parameters(family.name, o.adapter_type, o.grey), activations=1.0,
                         time=1.05)


def adapter_pipeline(pipe, adapter, scheduler=None):
    """The T2I-Adapter pipeline of `pipe`'s family (SD or SDXL) over `pipe`'s very modules and `adapter`."""
    import diffusers

    parts = dict(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                 adapter=adapter, scheduler=scheduler or pipe.scheduler)
    if getattr(pipe, "text_encoder_2", None) is not None:
        out = diffusers.StableDiffusionXLAdapterPipeline(text_encoder_2=pipe.text_encoder_2,
                                                         tokenizer_2=pipe.tokenizer_2, **parts)
    else:
        out = diffusers.StableDiffusionAdapterPipeline(safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False, **parts)
    out.set_progress_bar_config(disable=True)
    return out
