"""`sdstudio bench train --method controlnet`: our loop training a ControlNet against a plain loop written like
diffusers' examples/controlnet/train_controlnet.py, on the same model, pairs and seed.

The reference does what that script does per step: torchvision transforms for the image ([-1, 1]) and the
condition ([0, 1]), the VAE and the text encoder every step, `ControlNetModel.from_unet`, the ControlNet's
residuals into the frozen UNet, MSE on eps, AdamW, clip-grad, a constant schedule, `save_pretrained`. Ours runs
the `controlnet` method through `train.loop.run_loop` with its defaults (a diffusers folder plus the
original-layout file), with and without the latent and text caches. Each variant runs in its own process, so
peak memory (RSS on the CPU, max allocated on CUDA) is that variant's alone; timing starts after the base model
is loaded and ends when the ControlNet is written, so our caching and saving count against us.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("reference", "ours", "ours-cached")


def run_bench(args) -> int:
    from .bench_rounds import _make_dataset, print_table, run_rounds

    with tempfile.TemporaryDirectory(prefix="sdstudio-bench-cn-") as tmp:
        ds = _make_pairs(_make_dataset(Path(tmp) / "ds", args.images))
        results = run_rounds("sdstudio.train.bench_controlnet", VARIANTS, ds, Path(tmp), args)
    if results is None:
        return 1
    print_table(f"sdstudio bench train --method controlnet: {args.steps} steps, batch {args.batch_size}, "
                f"{args.resolution} px, {args.images} pairs, base {args.base}, device {args.device}, best of "
                f"{args.repeats} interleaved rounds", VARIANTS, results)
    return 0


def _make_pairs(folder: Path) -> Path:
    """A control image `x.cond.png` beside each image: its edges (canny), as the presets train on."""
    from PIL import Image

    from ..data.detectors import preprocess

    for p in sorted(folder.glob("*.png")):
        if not p.stem.endswith(".cond"):
            preprocess(Image.open(p).convert("RGB"), "canny", low=20, high=60).save(p.with_name(p.stem + ".cond.png"))
    return folder


def _reference(ds: Path, out: Path, steps: int, res: int, bs: int, base: str, device: str) -> float:
    """A plain ControlNet loop, as diffusers' train_controlnet.py writes it."""
    import torch
    import torch.nn.functional as F
    from diffusers import ControlNetModel, DDPMScheduler
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    from ..models.loading import load_base

    torch.manual_seed(0)
    c = load_base(base, device=device)
    noise_scheduler = DDPMScheduler.from_config(c.scheduler.config)
    t0 = time.time()
    controlnet = ControlNetModel.from_unet(c.unet).to(device)
    c.vae.requires_grad_(False)
    c.unet.requires_grad_(False)
    c.text_encoder.requires_grad_(False)
    controlnet.train()
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # "constant"
    image_transforms = transforms.Compose([
        transforms.Resize(res, interpolation=transforms.InterpolationMode.BILINEAR), transforms.CenterCrop(res),
        transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    conditioning_image_transforms = transforms.Compose([
        transforms.Resize(res, interpolation=transforms.InterpolationMode.BILINEAR), transforms.CenterCrop(res),
        transforms.ToTensor()])

    class PairsDataset(Dataset):
        def __init__(self):
            self.images = sorted(p for p in ds.glob("*.png") if not p.stem.endswith(".cond"))

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            p = self.images[i]
            ids = c.tokenizer(p.with_suffix(".txt").read_text(), max_length=c.tokenizer.model_max_length,
                              padding="max_length", truncation=True, return_tensors="pt").input_ids[0]
            return {"pixel_values": image_transforms(Image.open(p).convert("RGB")),
                    "conditioning_pixel_values": conditioning_image_transforms(
                        Image.open(p.with_name(p.stem + ".cond.png")).convert("RGB")),
                    "input_ids": ids}

    loader = DataLoader(PairsDataset(), batch_size=bs, shuffle=True, num_workers=0)
    step = 0
    while step < steps:
        for batch in loader:
            latents = c.vae.encode(batch["pixel_values"].to(device)).latent_dist.sample()
            latents = latents * c.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      device=device).long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = c.text_encoder(batch["input_ids"].to(device), return_dict=False)[0]
            down_block_res_samples, mid_block_res_sample = controlnet(
                noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=batch["conditioning_pixel_values"].to(device), return_dict=False)
            model_pred = c.unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                                down_block_additional_residuals=down_block_res_samples,
                                mid_block_additional_residual=mid_block_res_sample).sample
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=False)  # the script's default (--set_grads_to_none off)
            step += 1
            if step >= steps:
                break
    controlnet.save_pretrained(str(out))
    return time.time() - t0


def _ours(ds: Path, out: Path, steps: int, res: int, bs: int, base: str, device: str, cached: bool) -> float:
    from .bench_rounds import time_our_loop
    from .config import load_config

    cfg = load_config(None, ["method=controlnet", f"dataset={ds}", f"base_model={base}", f"output_dir={out}",
                             f"resolution={res}", f"max_steps={steps}", f"batch_size={bs}", "learning_rate=1e-5",
                             "sample_every=0", "save_every=0", "sample_prompts=[]", "buckets=false",
                             f"device={device}", "precision=fp32", f"cache_latents={'memory' if cached else 'off'}",
                             f"cache_text={str(cached).lower()}"])
    return time_our_loop(cfg, ds, out, base, device)


def main(argv: list[str]) -> None:
    from .bench_rounds import run_variant

    run_variant(argv, _reference, _ours)


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    main(sys.argv[1:])
