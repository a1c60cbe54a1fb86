"""Before spending GPU hours: how many steps, how long, and how much GPU memory a config needs.

The VRAM model adds what sits on the GPU during a LoRA step:
  1. the frozen base in the compute dtype (UNet + text encoder(s) + VAE; counted from the family's real
     architecture built on the meta device, so no weights load),
  2. what trains: fp32 weights + fp32 grads + the optimizer's state per trainable parameter (the method says how
     many through its `footprint` hook, with its activations and time as multiples of a LoRA step's),
  3. the largest transient: the UNet's activations for the batch (scaled by pixels, cut ~4x by gradient
     checkpointing), the VAE encoding an image (when latents are not cached) or decoding a preview,
  4. the CUDA context, plus 10% for allocator fragmentation.
The per-image constants are SD 1.5 at 512 px in fp16 with SDPA/xformers attention, from what kohya_ss and
OneTrainer users report (a rank-16 LoRA with gradient checkpointing, cached latents and 8-bit Adam trains on
6 GB cards; without checkpointing, batch 1 needs about 7-8 GB). They are estimates: the wizard keeps a margin.

Time uses measured-in-the-field speeds of SD 1.5 LoRA training (batch 1, 512 px, fp16, no checkpointing) per
GPU class, scaled by pixels, batch, gradient checkpointing (+30%) and the previews.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field

from ..errors import UserError

GB = 1024**3

# 3. Transients per image at 512x512, fp16 (GB).
UNET_ACTIVATIONS_GB = 3.0  # backward through the SD 1.5 UNet, no checkpointing
UNET_ACTIVATIONS_CHECKPOINTED_GB = 0.75  # with gradient checkpointing (recomputed per block)
TE_ACTIVATIONS_GB = 0.35  # training the text encoder (77 tokens; small next to the UNet)
VAE_ENCODE_GB = 1.2  # encoding one 512 px image (no_grad), only when latents are not cached
VAE_DECODE_GB = 1.3  # decoding one 512 px preview (no_grad)
CUDA_CONTEXT_GB = 0.9  # the CUDA context, cuDNN/cuBLAS workspaces
FRAGMENTATION = 1.10

# 2. Bytes of optimizer state per trainable parameter (weights and grads are fp32: 8 bytes more).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "lion": 4, "adafactor": 1, "prodigy": 16}


@dataclass(frozen=True)
class GpuClass:
    name: str
    memory_gb: float
    it_per_s: float  # SD 1.5 LoRA, batch 1, 512 px, fp16, no gradient checkpointing
    bf16: bool  # Ampere or newer: bf16 is fast and safe


# Speeds from kohya_ss/OneTrainer user reports and the diffusers examples (SDPA or xformers).
GPU_CLASSES = [
    GpuClass("GTX 1660 / RTX 2060 (6 GB)", 6, 0.9, False),
    GpuClass("RTX 3060 Ti / 3070 (8 GB)", 8, 2.2, True),
    GpuClass("RTX 3060 (12 GB)", 12, 1.8, True),
    GpuClass("T4 (16 GB)", 16, 1.1, False),
    GpuClass("RTX 4080 (16 GB)", 16, 4.5, True),
    GpuClass("RTX 3090 (24 GB)", 24, 3.5, True),
    GpuClass("RTX 4090 (24 GB)", 24, 6.0, True),
    GpuClass("A100 (40/80 GB)", 40, 6.5, True),
    GpuClass("H100 (80 GB)", 80, 9.0, True),
]
# What the wizard assumes for each memory choice when no GPU is detected.
DEFAULT_CLASS_FOR_MEMORY = {6: "GTX 1660 / RTX 2060 (6 GB)", 8: "RTX 3060 Ti / 3070 (8 GB)", 12: "RTX 3060 (12 GB)",
                            16: "T4 (16 GB)", 24: "RTX 3090 (24 GB)"}


def gpu_class(name: str = "", memory_gb: float = 0) -> GpuClass:
    """The class of a detected GPU (by name), else the usual card for `memory_gb`."""
    low = name.lower()
    for g in GPU_CLASSES:
        keys = [k.strip().lower() for k in g.name.split("(")[0].replace("RTX", "").replace("GTX", "").split("/")]
        if low and any(k and k in low for k in keys):
            return g
    fits = [m for m in DEFAULT_CLASS_FOR_MEMORY if m <= max(memory_gb, 6)]
    want = DEFAULT_CLASS_FOR_MEMORY[max(fits)]
    return next(g for g in GPU_CLASSES if g.name == want)


@dataclass
class Estimate:
    steps: int
    images_seen: int
    vram_gb: float
    minutes: float
    gpu: str
    parts: dict = field(default_factory=dict)  # GB per part, for the explanation
    on_cpu: bool = False  # training runs on the CPU: `minutes` come from a step measured here, not a GPU table
    sec_per_step: float = 0.0  # the per-step figure behind `minutes` (CPU: measured)

    def fits(self, memory_gb: float) -> bool:
        return self.on_cpu or self.vram_gb <= memory_gb

    def summary(self) -> str:
        if self.on_cpu:
            return (f"{self.steps} steps ({self.images_seen} image views) on the CPU (no CUDA GPU found), about "
                    f"{_fmt_minutes(self.minutes)} ({_fmt_seconds(self.sec_per_step)} per step, from "
                    f"{self.parts.get('basis', 'a step measured on this machine')})")
        return (f"{self.steps} steps ({self.images_seen} image views), about {self.vram_gb:.1f} GB of GPU memory, "
                f"about {_fmt_minutes(self.minutes)} on a {self.gpu}")


def _fmt_seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.1f} s"


def _fmt_minutes(m: float) -> str:
    if m < 1:
        return f"{max(1, round(m * 60))} s"
    return f"{m:.0f} min" if m < 90 else f"{m / 60:.1f} h"


# (family, targets) -> (unet, vae, text encoder params, UNet LoRA params per rank, per conv rank, TE LoRA per rank):
# what `_architecture` computes on the meta device, kept here so that a click answers at once (a test checks
# that the two agree).
KNOWN = {
    ("sd1", "attention"): (859520964, 83653863, 123060480, 199296, 0, 73728),
    ("sd1", "attention_mlp"): (859520964, 83653863, 123060480, 423936, 0, 165888),
    ("sd1", "locon"): (859520964, 83653863, 123060480, 506816, 544000, 165888),
    ("sd2", "attention"): (865910724, 83653863, 340387840, 207488, 0, 188416),
    ("sd2", "attention_mlp"): (865910724, 83653863, 340387840, 432128, 0, 423936),
    ("sd2", "locon"): (865910724, 83653863, 340387840, 515008, 544000, 423936),
}


def architecture(family_name: str, targets: str, rank: int, conv_rank: int) -> dict:
    known = KNOWN.get((family_name, targets))
    if known is None:
        return _architecture(family_name, targets, rank, conv_rank, targets)
    unet, vae, te, per_rank, per_conv, te_per_rank = known
    return {"unet": unet, "vae": vae, "te": te, "unet_lora": per_rank * rank + (per_conv * conv_rank),
            "te_lora": te_per_rank * rank}


@functools.lru_cache(maxsize=8)
def _architecture(family_name: str, targets: str, rank: int, conv_rank: int, te_targets: str) -> dict:
    """Parameter counts of the family's real UNet/text encoder/VAE and of a LoRA on them (meta device: no
    memory, no download)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..methods.lora import TE_ATTENTION, TE_MLP, unet_target_names
    from ..models.families import get_family

    fam = get_family(family_name)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**fam.unet)
        vae = AutoencoderKL(**fam.vae)
        tes = [(CLIPTextModelWithProjection if cls.endswith("Projection") else CLIPTextModel)(CLIPTextConfig(**cfg))
               for cls, cfg, _pad in fam.text]
    linear, conv = unet_target_names(unet, targets)
    mods = dict(unet.named_modules())

    def lora_params(mod, r: int) -> int:
        if isinstance(mod, torch.nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            return r * (mod.in_channels * k + mod.out_channels)
        return r * (mod.in_features + mod.out_features)

    unet_lora = sum(lora_params(mods[p], rank) for p in linear) + sum(lora_params(mods[p], conv_rank) for p in conv)
    te_suffixes = TE_ATTENTION + (TE_MLP if te_targets != "attention" else ())
    te_lora = sum(lora_params(m, rank) for te in tes for n, m in te.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.endswith(te_suffixes))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"unet": count(unet), "vae": count(vae), "te": sum(count(t) for t in tes), "unet_lora": unet_lora,
            "te_lora": te_lora}


def estimate(cfg, *, gpu: GpuClass | None = None, memory_gb: float = 0, n_images: int | None = None,
             device_is_cuda: bool = True) -> Estimate:
    """Steps, time and VRAM of a resolved TrainConfig; the method's `footprint` hook says what it trains."""
    from ..methods.base import hook
    from ..methods.registry import get_method
    from ..models.loading import family_of_ref

    gpu = gpu or gpu_class(memory_gb=memory_gb)
    fam = family_of_ref(str(cfg.base_model))
    o = cfg.options
    targets = getattr(o, "targets", "attention_mlp")
    rank = int(getattr(o, "rank", getattr(o, "initial_rank", 16)))  # AdaLoRA trains at its initial rank
    arch = architecture(fam.name, targets, rank, int(getattr(o, "conv_rank", 8)))
    fp = hook(get_method(cfg.method)(), "footprint")(cfg, arch, fam)
    te_trains = fp.text_encoder_trains

    # 1. The frozen base in the compute dtype (fp32 on CPU or when asked; bf16/fp16 otherwise).
    half = device_is_cuda and cfg.precision != "fp32"
    wbytes = 2 if half else 4
    base_gb = (arch["unet"] + arch["te"] + arch["vae"] + fp.extra_frozen) * wbytes / GB
    # 2. What trains.
    trainable = fp.trainable
    state = OPTIMIZER_STATE_BYTES.get(cfg.optimizer, 8)
    train_gb = trainable * (8 + state) / GB + (trainable * 4 / GB if cfg.ema else 0)
    # 3. The largest transient.
    image_pixels = (cfg.resolution / 512) ** 2
    pixels = image_pixels * _family_scale(fam.name, "memory")  # the UNet's activations per image
    per_image = UNET_ACTIVATIONS_CHECKPOINTED_GB if cfg.gradient_checkpointing else UNET_ACTIVATIONS_GB
    images = cfg.batch_size * (2 if cfg.prior_preservation else 1)
    act = per_image * pixels * images * fp.activations + (TE_ACTIVATIONS_GB * images if te_trains else 0)
    act *= 1 if half else 2
    # Every family has SD's VAE (SDXL's is the same architecture, retrained): its work scales with pixels alone.
    # Previews above PREVIEW_TILE_PX decode in tiles of that size (train/preview.py), so they cost one tile; in
    # fp16 diffusers decodes SDXL's VAE in fp32 (its force_upcast), which doubles it.
    from .preview import PREVIEW_TILE_PX

    decoded = min(image_pixels, (PREVIEW_TILE_PX / 512) ** 2)
    upcast = 2 if fam.is_xl and cfg.precision != "bf16" else 1
    transients = {"training activations": act,
                  "preview decode": VAE_DECODE_GB * decoded * (upcast if half else 2)}
    if cfg.cache_latents == "off":
        transients["VAE encode"] = VAE_ENCODE_GB * image_pixels * images * (1 if half else 2)
    peak_name = max(transients, key=transients.get)
    total = (CUDA_CONTEXT_GB + base_gb + train_gb + transients[peak_name]) * FRAGMENTATION
    parts = {"CUDA context": CUDA_CONTEXT_GB, "frozen base": base_gb, "trained weights + optimizer": train_gb,
             peak_name: transients[peak_name]}

    # Time: per step at batch 1/512 px from the GPU class, then batch, pixels, checkpointing, previews.
    pixels = image_pixels * _family_scale(fam.name, "time")  # the UNet's work per image
    sec_per_step = (images ** 0.85) * pixels / gpu.it_per_s * (1.3 if cfg.gradient_checkpointing else 1.0) * fp.time
    if te_trains:
        sec_per_step *= 1.1
    previews = (cfg.max_steps // cfg.sample_every if cfg.sample_every else 0) + 2
    preview_s = previews * len(cfg.sample_prompts) * cfg.sample_steps * 2 * pixels / (gpu.it_per_s * 3)
    minutes = (cfg.max_steps * sec_per_step + preview_s) / 60
    return Estimate(steps=cfg.max_steps, images_seen=cfg.max_steps * cfg.batch_size, vram_gb=round(total, 1),
                    minutes=minutes, gpu=gpu.name, parts={k: round(v, 2) for k, v in parts.items()})


def _family_scale(name: str, what: str) -> float:
    """The UNet's cost per pixel against SD 1.5's. SD 2.x has the same UNet width at a larger native size (pixels
    already scale). SDXL's UNet has ~3x the parameters and work ("time"), but not ~3x the activations per pixel:
    its top 128x128-latent level has no attention, where SD 1.5's activations are largest. kohya sd-scripts
    reports SDXL LoRA training at 1024 px in 8 GB with gradient checkpointing and the text encoders and VAE off the
    GPU, which leaves ~1.5 GB for activations; SD 1.5's per-pixel figure (3.0 GB at 1024 px) stays above that, so
    "memory" keeps 1.0: an upper bound until a GPU measures it (sdstudio bench vram)."""
    if name != "sdxl":
        return 1.0
    return 3.0 if what == "time" else 1.0


def check_fits(cfg, memory_gb: float, *, alternatives: dict[str, object] | None = None, **kw) -> Estimate:
    """The estimate, or a UserError when it cannot fit `memory_gb`, naming a preset that would."""
    est = estimate(cfg, memory_gb=memory_gb, **kw)
    if est.fits(memory_gb):
        return est
    better = [(name, estimate(c, memory_gb=memory_gb, **kw)) for name, c in (alternatives or {}).items()]
    better = [(n, e) for n, e in better if e.fits(memory_gb)]
    if better:
        name, e = min(better, key=lambda x: x[1].minutes)
        raise UserError(f"This preset needs about {est.vram_gb:.1f} GB of GPU memory, more than the {memory_gb:g} GB "
                        f"you have: use {name} (about {e.vram_gb:.1f} GB).")
    raise UserError(f"This training needs about {est.vram_gb:.1f} GB of GPU memory, more than the {memory_gb:g} GB "
                    f"you have, and no preset fits: lower the resolution or use a GPU with more memory.")


# -- on the CPU: from a step measured here ---------------------------------------------------------------------
# Forward GFLOPs of each family's UNet for one 512 px image (torch.utils.flop_counter on the meta device; a test
# recounts them). A training step costs about 3 forwards (forward + backward).
UNET_FORWARD_GFLOPS = {"sd1": 803.3, "sd2": 804.3}
CPU_MEASURE_PX = 128  # the tiny step measured for the plan: under a second on a busy 2-core machine


_MEASURE_LOCK = threading.Lock()


def measured_tiny_step(resolution: int, batch: int) -> float:
    """Seconds of one training step (forward + backward) of the tiny UNet on one CPU core, best of two after a
    warm-up. One core, because several OpenMP threads on a busy machine spin-wait and make the figure
    meaningless (and the plan slow); `cpu_estimate` scales it to the threads training will use. Measured once
    per size: concurrent plans wait for the first."""
    with _MEASURE_LOCK:
        return _measure_tiny_step(resolution, batch)


@functools.lru_cache(maxsize=8)
def _measure_tiny_step(resolution: int, batch: int) -> float:
    import time

    import torch
    # The module itself, not diffusers' lazy top level: two threads importing through it at once can fail.
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    from ..models.tiny import UNET_CONFIG

    # Built here, never through from_pretrained (its empty-weights loading patches torch.nn.Module for every
    # thread, and would put a training job's new weights on "meta"), and without the global RNG (a training job in
    # this process draws from it): on the meta device (a per-thread mode), then filled. Only the time counts.
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIG)
    unet = unet.to_empty(device="cpu")
    with torch.no_grad():
        for p in unet.parameters():
            p.fill_(0.01)
    gen = torch.Generator().manual_seed(0)
    side = max(8, resolution // 8)
    x = torch.randn(batch, 4, side, side, generator=gen)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=gen)
    t = torch.tensor([500] * batch)
    best = float("inf")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(3):
            t0 = time.perf_counter()
            unet(x, t, ctx).sample.float().pow(2).mean().backward()
            unet.zero_grad(set_to_none=True)
            if i:
                best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return best


@functools.lru_cache(maxsize=1)
def measured_cpu_gflops() -> float:
    """This CPU's fp32 matrix-multiply speed on one core, GFLOP/s (best of a few 512x512 products: ~50 ms)."""
    import time

    import torch

    gen = torch.Generator().manual_seed(0)  # not the global RNG: a training job in this process draws from it
    a, b = torch.randn(512, 512, generator=gen), torch.randn(512, 512, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(4):
                a @ b
            best = min(best, (time.perf_counter() - t0) / 4)
    finally:
        torch.set_num_threads(threads)
    return 2 * 512**3 / best / 1e9


CONV_EFFICIENCY = 0.5  # a UNet's convolutions and attention run at about half the speed of a plain matmul


def cpu_estimate(cfg, *, n_images: int | None = None) -> Estimate:
    """Steps and time of a resolved TrainConfig trained on this CPU. On the tiny model, one training step is
    measured here (at most 128 px, so the plan answers in about a second) and scaled by pixels; a real model's
    step is its UNet's FLOPs at the resolution over this CPU's measured speed. Previews cost their denoising steps
    the same way."""
    import torch

    from ..models.loading import family_of_ref

    images = cfg.batch_size * (2 if cfg.prior_preservation else 1) * cfg.gradient_accumulation
    # Threads help less than linearly (memory bandwidth, the parts that do not parallelise): n ** 0.7.
    speedup = max(1, torch.get_num_threads()) ** 0.7
    if str(cfg.base_model) == "tiny":
        px = min(cfg.resolution, CPU_MEASURE_PX)
        per_image = measured_tiny_step(px, 1) / speedup * (cfg.resolution / px) ** 2
        how = "a step measured on this machine"
    else:
        fam = family_of_ref(str(cfg.base_model)).name
        gflop = 3 * UNET_FORWARD_GFLOPS.get(fam, UNET_FORWARD_GFLOPS["sd1"] * 3) * (cfg.resolution / 512) ** 2
        per_image = gflop / (measured_cpu_gflops() * CONV_EFFICIENCY * speedup)
        how = "this CPU's measured speed"
    sec_per_step = per_image * images * (1.3 if cfg.gradient_checkpointing else 1.0)
    if getattr(cfg.options, "train_text_encoder", False):
        sec_per_step *= 1.1
    previews = (cfg.max_steps // cfg.sample_every if cfg.sample_every else 0) + 2
    # A preview denoising step is one forward with and one without the prompt: 2/3 of a training step.
    preview_s = previews * len(cfg.sample_prompts) * cfg.sample_steps * per_image * 2 / 3
    minutes = (cfg.max_steps * sec_per_step + preview_s) / 60
    return Estimate(steps=cfg.max_steps, images_seen=cfg.max_steps * cfg.batch_size * cfg.gradient_accumulation,
                    vram_gb=0.0, minutes=minutes, gpu="CPU", on_cpu=True, sec_per_step=sec_per_step,
                    parts={"basis": how})
