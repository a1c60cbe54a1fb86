"""The Method protocol and the registry: a training method is a small "setup" the one loop runs.

A method decides what trains (prepare), what the loss is (loss) and what files come out (save). Everything
else (precision, accumulation, optimizers, schedules, caching, previews, checkpoints, stop/pause/resume) is the
loop's job, so every method gets it for free. methods/lora.py is the reference: read it first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

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

    `cond` holds the named conditioning the method asked for with its `conditioning` attribute, cut like the
    images (data/conditioning.py): "control" (B, 3, H, W) in [0, 1], "mask" (B, 1, H/8, W/8) in [0, 1], on SDXL
    "time_ids" (B, 6): original size, crop top-left and target size, and whatever a new `Condition` adds; a
    variable-length one (boxes) is a list with one tensor per item.
    """

    captions: list[str]
    pixel_values: "torch.Tensor | None" = None  # (B, 3, H, W) in [-1, 1]
    latents: "torch.Tensor | None" = None  # (B, 4, H/8, W/8), already scaled by vae.config.scaling_factor
    input_ids: "torch.Tensor | None" = None  # (B, 77) per text encoder: list for SDXL
    encoder_hidden_states: "torch.Tensor | None" = None
    pooled_embeds: "torch.Tensor | None" = None  # SDXL: the second encoder's pooled projection, with the above
    is_class: "torch.Tensor | None" = None  # (B,) bool: prior-preservation (class) images
    cond: dict = field(default_factory=dict)  # name -> (B, ...) tensor, or a list of per-item tensors
    index: list = field(default_factory=list)  # each item's index in the dataset (TrainDataset.items)
    extra: dict = field(default_factory=dict)
    # The only source of randomness a loss may use (noise, timesteps, VAE sampling). The loop seeds it from
    # (seed, step, rank), which is what makes a resumed run repeat the uninterrupted one exactly.
    generator: "torch.Generator | None" = None

    @property
    def mask(self) -> "torch.Tensor | None":
        """The loss mask (B, 1, h, w) in latent space, when masked loss is on."""
        return self.cond.get("mask")

    @mask.setter
    def mask(self, value) -> None:
        if value is None:
            self.cond.pop("mask", None)
        else:
            self.cond["mask"] = value


class Method(Protocol):
    name: ClassVar[str]  # registry key, and `method = "..."` in a preset
    Config: ClassVar[type]  # its own [method] table, a dataclass

    def prepare(self, c: "Components", cfg: Any) -> list[ParamGroup]: ...

    def loss(self, c: "Components", batch: Batch, step: int) -> "torch.Tensor": ...

    def save(self, c: "Components", out: Path) -> list[Path]: ...


@dataclass
class Footprint:
    """What a method puts on the GPU beyond the frozen base, for the VRAM and time estimate (train/estimate.py):
    parameter counts and multiples of a LoRA step, so the estimate needs no method names."""

    trainable: int  # parameters that train: fp32 weights + grads + optimizer state each
    text_encoder_trains: bool = False  # the text encoder's activations are kept for its backward pass
    extra_frozen: int = 0  # parameters loaded besides the base that do not train
    activations: float = 1.0  # the backward pass's activations, as a multiple of a LoRA step's
    time: float = 1.0  # seconds per step, as a multiple of a LoRA step's


@dataclass
class RunInfo:
    """What the loop tells a method about the run (set as `method.run` before `prepare`): the settings, the
    dataset and how far training got. `save` reads it for file names and metadata."""

    cfg: Any  # the TrainConfig; cfg.options is the method's own table
    run_dir: Path
    step: int = 0
    layout: Any = None  # data.folder.DatasetLayout
    dataset_hash: str = ""
    tag_frequency: dict = field(default_factory=dict)
    started: float = 0.0
    # What the files' ss_* metadata reports, as the loop ran it:
    mixed_precision: str = "no"  # accelerate's: "no", "fp16" or "bf16"
    optimizer: str = ""  # the optimizer's class, "module.Class" (set once it is built)
    world: int = 1  # processes
    batches_per_epoch: int = 0
    bucket_info: dict | None = None  # formats.metadata.bucket_info


class MethodBase:
    """Optional hooks with their defaults. Subclass it (methods/lora.py does) and override what you need;
    the loop calls each hook through this class's defaults when a method does not define it.

    - `run`: a RunInfo, set by the loop before `prepare`.
    - `conditioning` (class attribute, tuple of names): what the dataset must give each item besides the image,
      as `batch.cond[name]` (data/conditioning.py says how each is found, checked and cut), e.g. ("control",).
      The preflight refuses a dataset where any item lacks one. Default: none.
    - `trainable_modules(c)`: [(prefix, module)] that train: put in train mode, gradient-checkpointed, checkpointed
      and put in eval mode for previews. Default: the UNet, and each text encoder with a trainable parameter.
    - `trainable_state_dict(c)` / `load_trainable_state_dict(c, sd)`: what a checkpoint stores and restores.
      Default: every parameter with requires_grad in `trainable_modules`, under "<prefix>.".
    - `text_encoder_trainable(c)`: whether the text encoders train; when False (and cache_text is on) the loop
      caches text embeddings and hands them in as `batch.encoder_hidden_states`. Default: any TE parameter
      has requires_grad after `prepare`.
    - `after_optimizer_step(c, step)`: right after the optimizer step, while the gradients are still there
      (AdaLoRA's sensitivity update and rank allocation); returns a dict of what to report with this step
      (the Step event's `extra`: AdaLoRA's ranks per layer), or None. Default: nothing.
    - `on_step_end(c, step)`: after each optimizer step (e.g. Textual Inversion restores the embedding rows
      it must not change). Default: nothing.
    - `preview_pipeline(c)`: the pipeline previews use, over the weights being trained (no copy). Default:
      `c.pipeline()` with a fast DPM-Solver scheduler. A method with "control" conditioning gets each preview's
      validation control image as `image=` (StableDiffusionControlNetPipeline and the Adapter pipeline take it).
    - `footprint(cfg, arch, family)`: a `Footprint` for the VRAM/time estimate; `arch` holds the base's parameter
      counts ("unet", "te", "vae") and a LoRA's on it ("unet_lora", "te_lora"). Default: a LoRA-sized bound.
    - `load_output(pipe, paths)`: load what `save` wrote into a fresh diffusers pipeline of the base model, as
      a user would. The contract test (tests/test_train_contract.py) uses it. Default: by file kind (LoRA ->
      `load_lora_weights`, embedding -> `load_textual_inversion`, diffusers folder -> `from_pretrained`).
    - `check_settings(cfg)`: checks of the method's own settings that need no model (e.g. a new token is not
      a known word), run in the preflight so a mistake is refused in seconds. Raise UserError. Default: none.
    - `unsupported_families` (class attribute, {family name: sentence}): base-model families the method does
      not train, refused by the preflight with that sentence. Default: none (SD1.x, SD2.x and SDXL all train).
    - `contract_settings` (class attribute, dict of `--set` keys to values): what the contract test adds to
      its fast tiny-model settings for this method, e.g. {"textual_inversion.token": "<sks>"}. Default: none.
    - `run_defaults` (class attribute, dict of top-level setting names to values): this method's own defaults
      for shared settings, e.g. EDLoRA's {"max_grad_norm": 0.0} (Mix-of-Show never clips). A value the config,
      the preset or `--set` gives still wins. Default: none.
    """

    run: RunInfo | None = None
    # Families this method refuses, each with the one sentence a user reads ({"sdxl": "... pick an SD 1.5 base."}).
    # The preflight says it in seconds; the contract test checks the refusal is this deliberate one.
    unsupported_families: ClassVar[dict] = {}
    contract_settings: ClassVar[dict] = {}
    run_defaults: ClassVar[dict] = {}
    conditioning: ClassVar[tuple[str, ...]] = ()

    def trainable_modules(self, c: "Components") -> list[tuple[str, Any]]:
        return [("unet", c.unet)] + [(f"te{i}", te) for i, te in enumerate(c.text_encoders)
                                     if any(p.requires_grad for p in te.parameters())]

    def trainable_state_dict(self, c: "Components") -> dict:
        out = {}
        for prefix, module in hook(self, "trainable_modules")(c):
            for name, p in module.named_parameters():
                if p.requires_grad:
                    out[f"{prefix}.{name}"] = p.detach()
        return out

    def load_trainable_state_dict(self, c: "Components", sd: dict) -> None:
        import torch

        with torch.no_grad():
            for prefix, module in hook(self, "trainable_modules")(c):
                params = dict(module.named_parameters())
                for key, value in sd.items():
                    if key.startswith(prefix + "."):
                        params[key[len(prefix) + 1:]].copy_(value)

    def check_settings(self, cfg) -> None:
        pass

    def text_encoder_trainable(self, c: "Components") -> bool:
        return any(p.requires_grad for te in c.text_encoders for p in te.parameters())

    def after_optimizer_step(self, c: "Components", step: int) -> dict | None:
        return None

    def on_step_end(self, c: "Components", step: int) -> None:
        pass

    def preview_pipeline(self, c: "Components"):
        from diffusers import DPMSolverMultistepScheduler

        return c.pipeline(scheduler=DPMSolverMultistepScheduler.from_config(c.scheduler.config))

    def load_output(self, pipe, paths: list[Path]):
        return default_load_output(pipe, paths)

    def footprint(self, cfg, arch: dict, family) -> Footprint:
        # Embeddings and other small methods: a LoRA-sized upper bound.
        return Footprint(trainable=arch["unet_lora"],
                         text_encoder_trains=bool(getattr(cfg.options, "train_text_encoder", False)))


TE2_LR_HELP = "Learning rate of SDXL's second text encoder (OpenCLIP bigG); 0: the same as text_encoder_lr."


def text_encoder_groups(per_encoder: list[list], lr: float, lr2: float = 0.0) -> list[ParamGroup]:
    """Parameter groups for what trains in each text encoder, each at its own lr: "text_encoder" (CLIP-L) at `lr`
    and, on SDXL, "text_encoder_2" (bigG) at `lr2` (0: `lr`), as sd-scripts' --text_encoder_lr takes two values."""
    names = ("text_encoder", "text_encoder_2")
    return [ParamGroup(names[i], params, lr if i == 0 or not lr2 else lr2)
            for i, params in enumerate(per_encoder) if params]


def hook(method: Any, name: str):
    """`method.name` if the method defines it, else MethodBase's default bound to `method`."""
    fn = getattr(method, name, None)
    return fn if fn is not None else getattr(MethodBase, name).__get__(method)


def default_load_output(pipe, paths: list[Path]):
    """Load a method's outputs into a diffusers pipeline the way a user would, by file kind."""
    from ..formats.kinds import detect_kind

    for p in paths:
        kind = detect_kind(p)
        if kind == "lora":
            pipe.load_lora_weights(str(p.parent), weight_name=p.name)
        elif kind == "embedding":
            pipe.load_textual_inversion(str(p))
        elif kind == "checkpoint" and Path(p).is_dir():
            pipe = type(pipe).from_pretrained(str(p), safety_checker=None, requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
    return pipe


REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a method available by its `name`."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"two methods are named {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls
