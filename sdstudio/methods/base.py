"""The Method protocol and the registry: a training method is a small "setup" the one loop runs.

A method decides what trains (prepare), what the loss is (loss) and what files come out (save). Everything
else (precision, accumulation, optimizers, schedules, caching, previews, checkpoints, stop/pause/resume) is the
loop's job, so every method gets it for free. methods/lora.py is the reference: read it first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..errors import UserError

if TYPE_CHECKING:
    import torch

    from ..models.loading import Components


@dataclass
class ParamGroup:
    """Parameters that train together at one learning rate (e.g. UNet LoRA at 1e-4, text-encoder LoRA at 5e-5)."""

    name: str
    params: list
    lr: float
    weight_decay: float | None = None  # None: the optimizer's default


@dataclass
class Batch:
    """One training batch as the loop hands it to `Method.loss`. Tensors are already on the device.

    Either `pixel_values` or `latents` is set (latents when the latent cache is on); either `input_ids` or
    `encoder_hidden_states` (the latter when the text-encoder cache is on and the text encoder is frozen).
    """

    captions: list[str]
    pixel_values: "torch.Tensor | None" = None  # (B, 3, H, W) in [-1, 1]
    latents: "torch.Tensor | None" = None  # (B, 4, H/8, W/8), already scaled by vae.config.scaling_factor
    input_ids: "torch.Tensor | None" = None  # (B, 77) per text encoder: list for SDXL
    encoder_hidden_states: "torch.Tensor | None" = None
    is_class: "torch.Tensor | None" = None  # (B,) bool: prior-preservation (class) images
    mask: "torch.Tensor | None" = None  # (B, 1, h, w) loss mask in latent space, optional
    extra: dict = field(default_factory=dict)


class Method(Protocol):
    name: ClassVar[str]  # registry key, and `method = "..."` in a preset
    Config: ClassVar[type]  # its own [method] table, a dataclass

    def prepare(self, c: "Components", cfg: Any) -> list[ParamGroup]: ...

    def loss(self, c: "Components", batch: Batch, step: int) -> "torch.Tensor": ...

    def save(self, c: "Components", out: Path) -> list[Path]: ...


REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a method available by its `name`."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"two methods are named {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type:
    from . import registry  # noqa: F401  (imports every method module explicitly)

    try:
        return REGISTRY[name]
    except KeyError:
        import difflib

        near = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise UserError(f"Unknown method {name!r}: use one of {', '.join(sorted(REGISTRY))}.{hint}") from None


def all_methods() -> dict[str, type]:
    from . import registry  # noqa: F401

    return dict(REGISTRY)
