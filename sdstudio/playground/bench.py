"""`sdstudio bench generate`: what a LoRA stack costs per denoising step, fused and unfused, as ratios against
the base in the same run; and what a weight change costs (time, and files read: it must read none)."""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="Playground: per-step cost of 4 LoRAs (unfused/fused) and of a weight change")
    p.add_argument("--base", default="tiny", help="base model (default: the built-in tiny model)")
    p.add_argument("--loras", type=int, default=4, help="how many LoRAs to stack")
    p.add_argument("--rank", type=int, default=16, help="rank of each generated LoRA")
    p.add_argument("--targets", choices=("all", "attention"), default="all",
                   help="modules the LoRAs cover: all Linear/Conv2d (a LoCon, the worst case) or the transformer "
                        "blocks and text encoder (kohya's default LoRA)")
    p.add_argument("--size", type=int, default=64, help="image size in pixels")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per timed generation")
    p.add_argument("--repeats", type=int, default=5, help="timed generations per setting (median reported)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run_bench)


def random_kohya_lora(unet, text_encoder, rank: int, seed: int, scale: float = 0.02, attention_only=False) -> dict:
    """A kohya-format LoRA over every Linear/Conv2d of the UNet and text encoder (like a full LoCon), or only
    over the transformer blocks and the text encoder (kohya's default network)."""
    import torch

    from ..formats.kinds import kohya_names_for

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for model, kind in ((unet, "unet"), (text_encoder, "te")):
        for name, path in kohya_names_for(model, kind).items():
            if attention_only and kind == "unet" and "attentions" not in path:
                continue
            mod = model.get_submodule(path)
            r = min(rank, mod.weight.shape[0], mod.weight.shape[1])
            if isinstance(mod, torch.nn.Conv2d):
                sd[f"{name}.lora_down.weight"] = torch.randn(r, mod.in_channels, *mod.kernel_size, generator=g) * scale
                sd[f"{name}.lora_up.weight"] = torch.randn(mod.out_channels, r, 1, 1, generator=g) * scale
            else:
                sd[f"{name}.lora_down.weight"] = torch.randn(r, mod.in_features, generator=g) * scale
                sd[f"{name}.lora_up.weight"] = torch.randn(mod.out_features, r, generator=g) * scale
            sd[f"{name}.alpha"] = torch.tensor(float(r) / 2)
    return sd


def run_bench(args) -> int:
    import torch

    from ..devices import pick_device
    from ..formats.safe_io import save_safetensors
    from .files import FILE_READS
    from .recipe import LoraItem, Recipe
    from .session import Playground

    device = pick_device(args.device)
    torch.set_grad_enabled(False)
    session = Playground(device=device)
    comps = session.base(args.base)
    tmp = Path(tempfile.mkdtemp(prefix="sdstudio-bench-"))
    files = []
    for i in range(args.loras):
        files.append(save_safetensors(random_kohya_lora(comps.unet, comps.text_encoder, args.rank, i,
                                                        attention_only=args.targets == "attention"),
                                      tmp / f"lora{i}.safetensors"))
    base = Recipe(base_model=args.base, prompt="a photo of a dog", steps=args.steps, width=args.size,
                  height=args.size, sampler="euler", cfg=7.0, seed=1)
    stacked = base.replace(lora=[LoraItem(str(f), weight=0.5) for f in files])

    from .pipeline import generate

    def per_step(recipe, fuse):
        """Seconds per denoising step of one generation; loading, applying and fusing happen before the clock."""
        p = session.prepare(recipe, fuse=fuse)
        t0 = time.perf_counter()
        generate(session.comps, p["recipe"], stack=session.stack)
        return (time.perf_counter() - t0) / recipe.steps

    settings = {"base": (base, False), "unfused": (stacked, False), "fused": (stacked, True)}
    for recipe, fuse in settings.values():  # warm up every path once
        per_step(recipe.replace(steps=2), fuse)
    # Round-robin, keeping each setting's fastest run: on a shared machine, background load only ever adds time.
    # "unfused" is the steady state: a generation after one with the same stack. Unfusing (after the fused
    # run) writes the base weights back, which makes the kept merged weights stale, so a short untimed run
    # makes them again first; the first generation after a change is timed on its own below.
    times = {k: [] for k in settings}
    kept = 0
    for _ in range(args.repeats):
        for key, (recipe, fuse) in settings.items():
            if key == "unfused":
                per_step(recipe.replace(steps=1), fuse)
            times[key].append(per_step(recipe, fuse))
            if key == "unfused":
                kept = session.stack.merged.used
    b, u, f = (min(times[k]) for k in ("base", "unfused", "fused"))
    # The first generation after a weight change: it pays the merges the unfused path then keeps (see
    # stack.MergedWeights), so it is timed on its own, each run with weights no earlier run used.
    after_change = []
    for r in range(args.repeats):
        changed = stacked.replace(lora=[LoraItem(str(f), weight=0.3 + 0.01 * r + 0.001 * j)
                                        for j, f in enumerate(files)])
        after_change.append(per_step(changed, False))
    u1 = min(after_change)

    # A weight change: apply a recipe that differs only in weights; count file reads while doing it.
    session.stack.apply(stacked)
    changes = []
    reads_before = FILE_READS["count"]
    for k in range(20):
        changed = stacked.replace(lora=[LoraItem(str(f), weight=0.1 + 0.04 * ((k + j) % 10))
                                        for j, f in enumerate(files)])
        t0 = time.perf_counter()
        session.stack.apply(changed)
        changes.append(time.perf_counter() - t0)
    reads = FILE_READS["count"] - reads_before

    where = "every Linear/Conv2d" if args.targets == "all" else "the transformer blocks and text encoder"
    print(f"device {device}, base {args.base}, {args.size}px, {args.steps} steps, {args.loras} LoRAs of rank "
          f"{args.rank} on {where}")
    print(f"per step: base {b * 1000:.1f} ms | unfused {u * 1000:.1f} ms ({u / b:.3f}x, target <= 1.25x) | "
          f"fused {f * 1000:.1f} ms ({f / b:.3f}x, target <= 1.02x)")
    print(f"unfused, first generation after a weight change: {u1 * 1000:.1f} ms per step ({u1 / b:.3f}x); "
          f"merged weights kept: {kept / 2**20:.1f} MiB")
    print(f"weight change: median {statistics.median(changes) * 1000:.2f} ms, max {max(changes) * 1000:.2f} ms "
          f"(target < 50 ms); files read during 20 changes: {reads} (target 0)")
    return 0
