"""One measured training run in a process of its own: steps/s, samples/s, peak device memory (allocated and
reserved) and what `sdstudio bench train` and `sdstudio bench vram` need to report model FLOP utilisation.

Two loops can be measured on the same model, data and batch:
- "ours": a preset through train/loop.py, as `sdstudio train` runs it (preflight, load, caches, previews);
- "reference": a plain loop written the way diffusers' examples/dreambooth/train_dreambooth_lora.py (and
  train_dreambooth_lora_sdxl.py) train: a DataLoader with torchvision transforms, the VAE and the text
  encoder(s) every step (the SDXL script keeps its VAE in fp32), peft LoRA on to_q/k/v/out with fp32 LoRA
  weights, accelerate's autocast and GradScaler, AdamW (8-bit when the preset uses it), clip-grad, MSE.

Each run is a child process (`python -m sdstudio.train.measure SPEC.json`) so its peak memory is its own; the
parent reads one JSON line back. Timing covers `steps` optimizer steps after `warmup` steps (cuDNN autotuning,
torch.compile, the allocator's first growth): caching and loading are outside it, peak memory covers all.

FLOPs are model FLOPs: one training step of the UNet (forward, and backward through every layer to the LoRA
weights) plus the text encoder when it trains, counted by torch.utils.flop_counter on the meta device (no
memory, no GPU), per sample. The VAE and a frozen text encoder are preprocessing a cache can remove, so they
are not counted: a loop that runs them every step spends time on work that is not the model's.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

GB = 1024**3

# Dense fp16/bf16 tensor-core peak (TFLOP/s) by GPU name, for model FLOP utilisation. Checked in order: the
# first name found in torch.cuda.get_device_name() wins (so "H100 PCIe" before "H100").
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("A100", 312.0),
               ("L40S", 362.0), ("L4", 121.0), ("A10G", 125.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0))


def peak_tflops(gpu_name: str) -> float | None:
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in gpu_name.lower():
            return tflops
    return None


@dataclass
class Spec:
    """What one measured run does (plain data: it travels to the child process as JSON)."""

    variant: str  # "ours" | "reference"
    base: str  # a model folder (full-size benchmark model) or "tiny" / "tiny-sdxl"
    dataset: str  # a folder of images with .txt captions
    out: str  # the run folder
    preset: str = ""  # a preset name (ours and the reference read their settings from it)
    sets: list = field(default_factory=list)  # --set overrides on top of the preset
    warmup: int = 2
    steps: int = 10
    device: str = "cuda"
    previews: bool = False  # keep the preset's first preview prompt (bench vram: a real run draws previews)


# -- readings -----------------------------------------------------------------------------------------------

class Probe:
    """Peak memory and the clock of the device a run uses: torch.cuda's allocator on CUDA, the process's RSS on
    the CPU (allocated = reserved there). The CUDA context and the libraries' workspaces are outside the
    allocator; `context_gb` is what the device held for this process before the first tensor."""

    def __init__(self, device: str) -> None:
        self.cuda = str(device).startswith("cuda")
        self.context_gb = 0.0

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.init()
            free, total = torch.cuda.mem_get_info()
            self.context_gb = max(0.0, (total - free - torch.cuda.memory_reserved()) / GB)
            torch.cuda.reset_peak_memory_stats()

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def peaks(self) -> dict:
        import torch

        if self.cuda:
            return {"peak_allocated_gb": torch.cuda.max_memory_allocated() / GB,
                    "peak_reserved_gb": torch.cuda.max_memory_reserved() / GB, "context_gb": self.context_gb}
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # KiB on Linux
        return {"peak_allocated_gb": rss, "peak_reserved_gb": rss, "context_gb": 0.0}

    def device_name(self) -> str:
        if self.cuda:
            import torch

            return torch.cuda.get_device_name()
        import platform

        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


# -- the settings both loops share -----------------------------------------------------------------------------

def resolve(spec: Spec):
    """The TrainConfig of `spec`: the preset, then the run's fixed settings, then spec.sets."""
    from .config import load_config, read_toml

    prompts = "[]"
    if spec.previews and spec.preset:
        first = (read_toml(spec.preset).get("sample_prompts") or ["a photo"])[:1]
        prompts = json.dumps(first)
    fixed = [f"base_model={spec.base}", f"dataset={spec.dataset}", f"output_dir={spec.out}",
             f"max_steps={spec.warmup + spec.steps}", "sample_every=0", "save_every=0", f"sample_prompts={prompts}",
             "sample_steps=2", f"device={spec.device}"]
    return load_config(spec.preset or None, fixed + list(spec.sets))


# -- ours ------------------------------------------------------------------------------------------------------

def run_ours(spec: Spec, probe: Probe) -> dict:
    """The preset through the one loop, exactly as `sdstudio train` runs it, except that the base may be a
    full-size random model (load_base(benchmark=True))."""
    import torch

    from ..devices import pick_device
    from ..events import Step
    from ..jobs import Commands
    from ..methods.base import RunInfo
    from ..methods.registry import get_method
    from ..models.loading import load_base
    from .loop import _make_accelerator, preflight, run_loop
    from .speed import check_speed_settings

    cfg = resolve(spec)
    pre = preflight(cfg)  # the same refusals as `sdstudio train` (e.g. a family the loop cannot train yet)
    device = pick_device(cfg.device)
    check_speed_settings(cfg, device)
    acc, dtype = _make_accelerator(cfg, device)
    probe.start()
    c = load_base(cfg.base_model, dtype=dtype, device=str(acc.device), benchmark=True)
    method = get_method(cfg.method)()
    method.run = RunInfo(cfg=cfg, run_dir=pre.run_dir, layout=pre.layout)
    marks: dict[int, float] = {}

    def emit(ev) -> None:
        if isinstance(ev, Step):
            probe.sync()
            marks[ev.step] = time.perf_counter()

    torch.manual_seed(0)
    run_loop(method, c, pre.data, cfg, emit, Commands(), acc=acc, run_dir=pre.run_dir)
    seconds = marks[spec.warmup + spec.steps] - marks[spec.warmup] if spec.warmup else \
        marks[spec.steps] - min(marks.values())  # without warm-up the first step's own time is unknown
    timed = spec.steps if spec.warmup else spec.steps - 1
    return _result(spec, cfg, probe, seconds, timed, te_trains=_te_trains(cfg))


def _te_trains(cfg) -> bool:
    o = cfg.options
    return bool(getattr(o, "train_text_encoder", False)) or cfg.method in ("textual_inversion", "pivotal", "edlora")


def _result(spec: Spec, cfg, probe: Probe, seconds: float, timed: int, te_trains: bool) -> dict:
    steps_per_s = timed / seconds if timed > 0 and seconds > 0 else 0.0  # bench vram's 1-step runs time nothing
    out = {"variant": spec.variant, "preset": spec.preset, "method": cfg.method, "resolution": cfg.resolution,
           "batch": cfg.batch_size, "precision": cfg.precision, "gradient_checkpointing": cfg.gradient_checkpointing,
           "optimizer": cfg.optimizer, "rank": int(getattr(cfg.options, "rank", 0) or 0), "te_trains": te_trains, "steps_timed": timed, "seconds": seconds,
           "steps_per_s": steps_per_s, "samples_per_s": steps_per_s * cfg.batch_size,
           "device_name": probe.device_name()}
    out.update(probe.peaks())
    return out


# -- the reference ---------------------------------------------------------------------------------------------

def run_reference(spec: Spec, probe: Probe) -> dict:
    """A plain LoRA loop as diffusers' train_dreambooth_lora(_sdxl).py writes it, with the preset's resolution,
    batch, rank, precision, gradient checkpointing and optimizer (8-bit when the preset uses it), and a text
    encoder LoRA when the preset trains one; its own LoRA targets (to_q/k/v/out) and no caches."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    from ..devices import pick_device, pick_dtype
    from ..models.loading import load_base

    cfg = resolve(spec)
    device = pick_device(cfg.device)
    weight_dtype = pick_dtype(device, cfg.precision)
    mp = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(weight_dtype, "no")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh process normally; tests run several here
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=mp, cpu=device == "cpu")
    probe.start()
    torch.manual_seed(0)
    c = load_base(cfg.base_model, dtype=weight_dtype, device=str(accelerator.device), benchmark=True)
    xl = c.family.is_xl
    if xl:  # "The VAE is always in float32 to avoid NaN losses."
        c.vae.to(dtype=torch.float32)
    noise_scheduler = DDPMScheduler.from_config(c.scheduler.config)
    rank = int(getattr(cfg.options, "rank", 4))
    te_trains = bool(getattr(cfg.options, "train_text_encoder", False))
    c.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                  target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    models = [c.unet]
    if te_trains:
        for te in c.text_encoders:
            te.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                      target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
            models.append(te)
    if mp != "no":
        cast_training_params(models, dtype=torch.float32)  # only the LoRA weights, in fp32
    if cfg.gradient_checkpointing:
        c.unet.enable_gradient_checkpointing()
        if te_trains:
            for te in c.text_encoders:
                te.gradient_checkpointing_enable()
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=1e-2)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-2)
    res = cfg.resolution
    tf = transforms.Compose([transforms.Resize(res, interpolation=transforms.InterpolationMode.BILINEAR),
                             transforms.CenterCrop(res), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    images = sorted(p for p in Path(spec.dataset).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))

    class DreamBoothDataset(Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            with Image.open(images[i]) as im:
                size = (im.height, im.width)
                pixels = tf(im.convert("RGB"))
            cap = images[i].with_suffix(".txt")
            prompt = cap.read_text(encoding="utf-8") if cap.is_file() else cfg.instance_prompt
            ids = [tok(prompt, truncation=True, padding="max_length", max_length=tok.model_max_length,
                       return_tensors="pt").input_ids[0] for tok in c.tokenizers]
            return {"pixel_values": pixels, "input_ids": ids, "original_size": size}

    def collate(examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "input_ids": [torch.stack([e["input_ids"][k] for e in examples]) for k in range(len(c.tokenizers))],
                "original_sizes": [e["original_size"] for e in examples]}

    loader = DataLoader(DreamBoothDataset(), batch_size=cfg.batch_size, shuffle=True, num_workers=0,
                        collate_fn=collate, drop_last=True)
    unet, optimizer, loader = accelerator.prepare(c.unet, optimizer, loader)
    if te_trains:
        c.text_encoders = [accelerator.prepare(te) for te in c.text_encoders]
    for m in models:
        m.train()

    def encode_prompt(batch):
        # SD 1.x: the last hidden state; SDXL: both encoders' penultimate states side by side + the pooled
        # projection of the second (as the SDXL script's encode_prompt).
        if not xl:
            return c.text_encoders[0](batch["input_ids"][0].to(accelerator.device), return_dict=False)[0], None
        embeds, pooled = [], None
        for te, ids in zip(c.text_encoders, batch["input_ids"]):
            out = te(ids.to(accelerator.device), output_hidden_states=True, return_dict=True)
            pooled = out[0]
            embeds.append(out.hidden_states[-2])
        return torch.cat(embeds, dim=-1), pooled.view(pooled.shape[0], -1)

    total = spec.warmup + spec.steps
    step, t0 = 0, None
    while step < total:
        for batch in loader:
            if step == spec.warmup:
                probe.sync()
                t0 = time.perf_counter()
            pixel_values = batch["pixel_values"].to(accelerator.device, dtype=c.vae.dtype)
            model_input = c.vae.encode(pixel_values).latent_dist.sample() * c.vae.config.scaling_factor
            model_input = model_input.to(weight_dtype)
            noise = torch.randn_like(model_input)
            bsz = model_input.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                                      device=model_input.device).long()
            noisy = noise_scheduler.add_noise(model_input, noise, timesteps)
            if te_trains:
                ehs, pooled = encode_prompt(batch)
            else:
                with torch.no_grad():
                    ehs, pooled = encode_prompt(batch)
            kwargs = {}
            if xl:
                time_ids = [list(s) + [0, 0] + [res, res] for s in batch["original_sizes"]]
                kwargs["added_cond_kwargs"] = {"text_embeds": pooled,
                                               "time_ids": torch.tensor(time_ids, device=accelerator.device,
                                                                        dtype=weight_dtype)}
            pred = unet(noisy, timesteps, ehs, return_dict=False, **kwargs)[0]
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step >= total:
                break
    probe.sync()
    seconds = time.perf_counter() - (t0 if t0 is not None else 0.0)
    return _result(spec, cfg, probe, seconds, spec.steps, te_trains=te_trains)


# -- model FLOPs -----------------------------------------------------------------------------------------------

def model_flops(base: str, resolution: int, *, rank: int = 16, te_trains: bool = False) -> float:
    """FLOPs of one training sample (see the module docstring), counted on the meta device from the model's
    configs; cached on disk by config, size and rank (SDXL's count takes tens of seconds of Python)."""
    folder = _model_folder(base)
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    te_cfgs = [json.loads((folder / sub / "config.json").read_text())
               for sub in ("text_encoder", "text_encoder_2") if (folder / sub / "config.json").is_file()]
    key = hashlib.sha256(json.dumps([unet_cfg, te_cfgs if te_trains else [], resolution, rank, te_trains],
                                    sort_keys=True).encode()).hexdigest()[:16]
    cache = _flops_cache()
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if key not in known:
        known[key] = _count_flops(json.dumps(unet_cfg), json.dumps(te_cfgs), resolution, rank, te_trains)
        from ..formats.safe_io import atomic_write_text

        atomic_write_text(cache, json.dumps(known, indent=1))
    return float(known[key])


def _model_folder(base: str) -> Path:
    from ..models.loading import TINY_REFS

    if base in TINY_REFS:
        from ..models.tiny import tiny_model_dir

        return tiny_model_dir(TINY_REFS[base])
    return Path(base)


def _flops_cache() -> Path:
    import diffusers
    import torch

    root = Path(os.environ.get("SDSTUDIO_CACHE", Path.home() / ".cache" / "sdstudio"))
    return root / f"flops-t{torch.__version__}-d{diffusers.__version__}.json"


@functools.lru_cache(maxsize=16)
def _count_flops(unet_json: str, te_json: str, resolution: int, rank: int, te_trains: bool) -> float:
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_cfg = {k: v for k, v in json.loads(unet_json).items() if not k.startswith("_")}
    te_cfgs = json.loads(te_json)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_cfg)
        tes = [(CLIPTextModelWithProjection if "WithProjection" in str(cfg.get("architectures")) else CLIPTextModel)(
            CLIPTextConfig.from_dict(cfg)) for cfg in te_cfgs]
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    for te in tes:
        te.requires_grad_(False)
        te.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    n = resolution // 8
    x = torch.randn(1, unet.config.in_channels, n, n, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        if tes:
            outs = [te(ids, output_hidden_states=True) for te in tes]
            ehs = torch.cat([o.hidden_states[-2] if len(tes) > 1 else o[0] for o in outs], dim=-1)
            pooled = outs[-1][0]
        else:
            ehs = torch.randn(1, 77, unet.config.cross_attention_dim, device="meta")
            pooled = torch.randn(1, unet.config.projection_class_embeddings_input_dim or 1, device="meta")
        kwargs = {}
        if unet.config.addition_embed_type == "text_time":
            pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled[:, :pooled_dim] if tes else
                                           torch.randn(1, pooled_dim, device="meta"),
                                           "time_ids": torch.zeros(1, 6, device="meta")}
        out = unet(x, t, ehs, return_dict=False, **kwargs)[0]
        out.float().pow(2).mean().backward()
    return float(counter.get_total_flops())


# -- the child process -------------------------------------------------------------------------------------------

def run_isolated(spec: Spec, timeout: float | None = None) -> dict:
    """Run `spec` in a child process; its JSON result, or {"error": one line} when it failed (out of memory, a
    refusal such as a family the loop cannot train yet, a timeout)."""
    cmd = [sys.executable, "-m", "sdstudio.train.measure", json.dumps(asdict(spec))]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": spec.variant, "preset": spec.preset, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in r.stdout.strip().splitlines() if ln.startswith("{")]
    if r.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"variant": spec.variant, "preset": spec.preset, "error": _last_error_line(r.stderr)}


def _last_error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "out of memory" in ln.lower():
            return "out of memory"
    return (lines[-1] if lines else "failed with no message")[:300]


def measure(spec: Spec, probe: Probe | None = None) -> dict:
    """Run `spec` here, in this process."""
    probe = probe or Probe(spec.device)
    Path(spec.out).mkdir(parents=True, exist_ok=True)
    if spec.variant == "ours":
        return run_ours(spec, probe)
    if spec.variant == "reference":
        return run_reference(spec, probe)
    raise ValueError(f"unknown variant {spec.variant!r}")


def cuda_context_gb() -> float:
    """What a process holds on the GPU once CUDA is up and before its first tensor (the CUDA context), read in a
    child process of its own while nothing else runs: parallel runs cannot read their own."""
    r = subprocess.run([sys.executable, "-m", "sdstudio.train.measure", "--context"], capture_output=True, text=True,
                       env=dict(os.environ), timeout=120)
    return float(json.loads(r.stdout.strip().splitlines()[-1])["context_gb"])


def main(argv: list[str]) -> int:
    from ..errors import UserError

    if argv[:1] == ["--context"]:
        probe = Probe("cuda")
        probe.start()
        print(json.dumps({"context_gb": probe.context_gb}))
        return 0
    spec = Spec(**json.loads(argv[0]))
    try:
        result = measure(spec)
    except UserError as exc:  # a refusal: one line for the table
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("SDSTUDIO_QUIET", "1")
    sys.exit(main(sys.argv[1:]))
