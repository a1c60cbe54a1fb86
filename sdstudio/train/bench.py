"""`sdstudio bench train`: our loop against a minimal plain-diffusers LoRA loop, same model, data and seed.

The reference is written the way diffusers' examples/dreambooth/train_dreambooth_lora.py trains: a
DataLoader with torchvision transforms, the VAE and the text encoder run every step, peft LoRA on the UNet's
attention, AdamW, clip-grad, MSE on eps. Each variant runs in its own process, so peak memory (RSS on the
CPU, max allocated on CUDA) is that variant's alone. Timing starts after the model is loaded and ends after
the last step and the LoRA file are written; our caching time counts against us.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from .bench_rounds import _make_dataset, print_table, run_rounds, run_variant, time_our_loop

VARIANTS = ("reference", "ours", "ours-cached")


def register_bench(sub) -> None:
    p = sub.add_parser("train", help="our training loop vs a plain diffusers loop (steps/s, peak memory): LoRA, or "
                                     "ControlNet with --method controlnet")
    p.add_argument("--method", default="lora", choices=("lora", "controlnet"),
                   help="lora (vs train_dreambooth_lora.py) or controlnet (vs train_controlnet.py; bench_controlnet.py)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per variant (default 30)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--base", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds, variants interleaved; the best round of each counts (a shared machine is noisy)")
    from .bench_gpu import register_args

    register_args(p)  # --arch sd15,sdxl --device cuda: full-size models, each memory preset (train/bench_gpu.py)
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    if getattr(args, "method", "lora") == "controlnet":
        from .bench_controlnet import run_bench as run_controlnet_bench

        return run_controlnet_bench(args)
    if args.arch:
        from .bench_gpu import run_matrix

        return run_matrix(args)
    with tempfile.TemporaryDirectory(prefix="sdstudio-bench-") as tmp:
        ds = _make_dataset(Path(tmp) / "ds", args.images)
        results = run_rounds("sdstudio.train.bench", VARIANTS, ds, Path(tmp), args)
    if results is None:
        return 1
    print_table(f"sdstudio bench train: {args.steps} steps, batch {args.batch_size}, {args.resolution} px, "
                f"{args.images} images, base {args.base}, device {args.device}, best of {args.repeats} interleaved "
                f"rounds", VARIANTS, results)
    return 0


def _reference(ds: Path, out: Path, steps: int, res: int, bs: int, base: str, device: str) -> float:
    """A plain diffusers LoRA loop, as train_dreambooth_lora.py writes it."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    from ..models.loading import load_base

    torch.manual_seed(0)
    c = load_base(base, device=device)
    noise_scheduler = DDPMScheduler.from_config(c.scheduler.config)
    t0 = time.time()
    c.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                  target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in c.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    tf = transforms.Compose([transforms.Resize(res, interpolation=transforms.InterpolationMode.BILINEAR),
                             transforms.CenterCrop(res), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])

    class DreamBoothDataset(Dataset):
        def __init__(self):
            self.images = sorted(ds.glob("*.png"))

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            ids = c.tokenizer(self.images[i].with_suffix(".txt").read_text(), truncation=True, padding="max_length",
                              max_length=c.tokenizer.model_max_length, return_tensors="pt").input_ids[0]
            return {"pixel_values": tf(Image.open(self.images[i]).convert("RGB")), "input_ids": ids}

    loader = DataLoader(DreamBoothDataset(), batch_size=bs, shuffle=True, num_workers=0)
    c.unet.train()
    step = 0
    while step < steps:
        for batch in loader:
            pixel_values = batch["pixel_values"].to(device)
            model_input = c.vae.encode(pixel_values).latent_dist.sample() * c.vae.config.scaling_factor
            noise = torch.randn_like(model_input)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (model_input.shape[0],),
                                      device=device).long()
            noisy = noise_scheduler.add_noise(model_input, noise, timesteps)
            ehs = c.text_encoder(batch["input_ids"].to(device), return_dict=False)[0]
            pred = c.unet(noisy, timesteps, ehs, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step >= steps:
                break
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=get_peft_model_state_dict(c.unet))
    return time.time() - t0


def _ours(ds: Path, out: Path, steps: int, res: int, bs: int, base: str, device: str, cached: bool) -> float:
    from .config import load_config

    cfg = load_config(None, [f"dataset={ds}", f"base_model={base}", f"output_dir={out}", f"resolution={res}",
                             f"max_steps={steps}", f"batch_size={bs}", "sample_every=0", "save_every=0",
                             "sample_prompts=[]", "lora.rank=4", "lora.alpha=4", "lora.targets=attention",
                             "buckets=false", f"device={device}", "precision=fp32",
                             f"cache_latents={'memory' if cached else 'off'}", f"cache_text={str(cached).lower()}"])
    return time_our_loop(cfg, ds, out, base, device)


def main(argv: list[str]) -> None:
    run_variant(argv, _reference, _ours)


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    main(sys.argv[1:])
