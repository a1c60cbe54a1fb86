"""The speed options of a training run: the attention kernel (SDPA's backends or xformers), torch.compile of the
UNet, channels_last, cuDNN autotuning and the latent cache on the GPU (fused AdamW lives in train/optim.py).

Each is a TrainConfig setting and none changes the maths. Each stays at its old default until
`sdstudio bench train --speed` has measured it on a GPU (the ratio against the same run without it), so a
default only changes with a figure behind it.
"""
from __future__ import annotations

import contextlib

from ..errors import UserError

# attention setting -> torch.nn.attention.SDPBackend member
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
                 "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_math": "MATH"}
CUDA_ONLY_BACKENDS = ("sdpa_efficient", "sdpa_cudnn")
# torch.compile's arguments; the CPU tests use the "eager" backend (dynamo's tracing without a C++ build).
COMPILE_KWARGS: dict = {}


def check_speed_settings(cfg, device: str) -> None:
    """Refuse, before any model loads, the options this device cannot run."""
    cuda = str(device).startswith("cuda")
    if cfg.attention in CUDA_ONLY_BACKENDS and not cuda:
        raise UserError(f"attention = {cfg.attention} needs a CUDA GPU: use auto, sdpa or sdpa_math here.")
    if cfg.attention == "xformers" and not cuda:
        raise UserError("attention = xformers needs a CUDA GPU: use auto or sdpa here.")


class SpeedOptions:
    """Applied once after the method attached what trains; `step()` wraps each forward/backward; `restore()`
    puts the modules and the global flags back (before saving: diffusers writes contiguous tensors)."""

    def __init__(self, c, cfg, device, modules=None) -> None:
        self.c, self.cfg, self.device = c, cfg, str(device)
        # The attention kernel covers every module on the backward path (the UNet and what trains beside it:
        # a ControlNet, an adapter); channels_last and compile stay on the UNet, which they were measured on.
        self.modules = list(modules) if modules is not None else [c.unet]
        self._cudnn = None
        self._channels_last = False
        self._compiled = False

    def apply(self) -> "SpeedOptions":
        import torch

        cfg, c, cuda = self.cfg, self.c, self.device.startswith("cuda")
        check_speed_settings(cfg, self.device)
        # 1. The attention kernel: xformers when asked (or "auto" and installed, on CUDA), else SDPA, whose
        #    backend `step()` pins when asked.
        if cuda and cfg.attention in ("auto", "xformers"):
            from ..devices import has_xformers

            if has_xformers():
                for m in self.modules:
                    if hasattr(m, "enable_xformers_memory_efficient_attention"):
                        m.enable_xformers_memory_efficient_attention()
            elif cfg.attention == "xformers":
                raise UserError("attention = xformers but xformers is not installed: pip install xformers, or use "
                                "sdpa.")
        # 2. cuDNN autotuning: the first step of each new shape tries the convolution algorithms.
        if cfg.cudnn_benchmark:
            self._cudnn = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = True
        # 3. channels_last: NHWC convolutions (tensor cores prefer them); inputs follow the weights.
        if cfg.channels_last:
            c.unet.to(memory_format=torch.channels_last)
            self._channels_last = True
        # 4. torch.compile of the UNet in place (state-dict keys unchanged); the first steps compile.
        if cfg.compile_unet:
            c.unet.compile(**COMPILE_KWARGS)
            self._compiled = True
        return self

    def step(self):
        """The context of one training step (and of previews): the SDPA backend when one is pinned."""
        name = SDPA_BACKENDS.get(self.cfg.attention)
        if name is None:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([getattr(SDPBackend, name)])

    @contextlib.contextmanager
    def uncompiled(self):
        """Previews run the UNet as it is, not compiled: under no_grad, with guidance's doubled batch and the
        sampler's own shapes, each would make torch.compile trace (and on CUDA build) the UNet again, minutes
        for the few images a preview draws."""
        compiled = self.c.unet._compiled_call_impl if self._compiled else None
        if compiled is None:
            yield
            return
        self.c.unet._compiled_call_impl = None
        try:
            yield
        finally:
            if self._compiled:  # (restore() inside the block would have turned compile off for good)
                self.c.unet._compiled_call_impl = compiled

    def restore(self) -> None:
        import torch

        if self._compiled:
            self.c.unet._compiled_call_impl = None  # what nn.Module.compile set
            self._compiled = False
        if self._channels_last:
            self.c.unet.to(memory_format=torch.contiguous_format)
            self._channels_last = False
        if self._cudnn is not None:
            torch.backends.cudnn.benchmark = self._cudnn
            self._cudnn = None
