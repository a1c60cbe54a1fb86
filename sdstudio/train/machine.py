"""One place decides the settings that depend on this machine: optimizer, precision, attention kernel, batch.

A preset is written for a kind of card ("8-bit Adam on a 6 GB GPU"); the machine it meets may have no CUDA, no
bitsandbytes, no xformers, no bf16, or less memory. `fit_to_machine(cfg)` returns the config that will really
run here and a list of `Change`s, each saying what it changed and why. The wizard, the Train tab (before Start,
in words) and `sdstudio train` all call it, so the same preset behaves the same way everywhere.

`train.loop.train` itself stays strict: a config that asks for something this machine lacks is an error there,
so a script that bypasses this function hears about it instead of silently training something else.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Machine:
    """What this machine offers, as far as training settings care."""

    device: str  # "cuda", "mps" or "cpu": where training will run
    gpu_name: str = ""
    memory_gb: float = 0.0  # the GPU's memory (0: no GPU, or unknown)
    bitsandbytes: bool = False
    xformers: bool = False
    bf16: bool = False  # the GPU runs bf16 well (Ampere or newer)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def describe(self) -> str:
        if self.cuda:
            return f"{self.gpu_name or 'a CUDA GPU'}" + (f" ({self.memory_gb:g} GB)" if self.memory_gb else "")
        return "Apple GPU (MPS)" if self.device == "mps" else "the CPU (no CUDA GPU found)"


def detect(preferred: str = "auto") -> Machine:
    """This machine, for a run that asks for `preferred` (a TrainConfig.device value)."""
    from ..devices import gpu_summary, has_xformers, pick_device

    device = pick_device(preferred)
    if not device.startswith("cuda"):
        return Machine(device=device)
    import torch

    info = gpu_summary()
    return Machine(device=device, gpu_name=info.get("name", ""), memory_gb=float(info.get("total_gb", 0)),
                   bitsandbytes=_has_bitsandbytes(), xformers=has_xformers(), bf16=torch.cuda.is_bf16_supported())


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class Change:
    """One setting this machine made us change."""

    key: str
    old: object
    new: object
    why: str

    def __str__(self) -> str:
        return f"{self.key} {self.old} → {self.new}: {self.why}"


def fit_to_machine(cfg, machine: Machine | None = None):
    """(the config that will run on `machine`, [Change, ...]). `cfg` is a resolved TrainConfig; it is not
    modified. With nothing to change, the same values come back and the list is empty."""
    m = machine or detect(cfg.device)
    changes: list[Change] = []

    def change(key: str, new, why: str) -> None:
        changes.append(Change(key, getattr(cfg, key), new, why))

    # 1. Optimizer: 8-bit Adam is a bitsandbytes CUDA kernel.
    if cfg.optimizer == "adamw8bit" and not (m.cuda and m.bitsandbytes):
        why = ("8-bit Adam needs a CUDA GPU" if not m.cuda else "8-bit Adam needs bitsandbytes (pip install "
               "bitsandbytes)") + ": AdamW trains the same way with about 0.1 GB more memory"
        change("optimizer", "adamw", why)
    # 2. Precision: half precision is for GPUs; bf16 needs Ampere or newer.
    if cfg.precision == "fp16" and m.device == "cpu":
        change("precision", "fp32", "fp16 needs a GPU; the CPU trains in fp32")
    elif cfg.precision == "bf16" and m.cuda and not m.bf16:
        change("precision", "fp16", f"{m.gpu_name or 'this GPU'} has no fast bf16 (it needs an Ampere or newer card)")
    # 3. Attention: xformers is a CUDA extension that may not be installed.
    if cfg.attention == "xformers" and not (m.cuda and m.xformers):
        change("attention", "sdpa", "xformers needs a CUDA GPU" if not m.cuda else "xformers is not installed")
    # 4. Batch: on a GPU of known size, halve the batch until the estimate fits, and accumulate gradients to keep
    #    the same images per optimizer step.
    out = dataclasses.replace(cfg, **{c.key: c.new for c in changes})
    if m.cuda and m.memory_gb and cfg.batch_size > 1:
        from .estimate import estimate, gpu_class

        gpu = gpu_class(m.gpu_name, m.memory_gb)
        batch, accum = cfg.batch_size, cfg.gradient_accumulation
        while batch > 1 and not estimate(dataclasses.replace(out, batch_size=batch, gradient_accumulation=accum),
                                         gpu=gpu).fits(m.memory_gb):
            batch, accum = batch // 2, accum * 2
        if batch != cfg.batch_size:
            why = (f"batch {cfg.batch_size} needs more than the {m.memory_gb:g} GB of {m.gpu_name or 'this GPU'}; "
                   f"{accum} accumulated batches of {batch} keep {batch * accum} images per step")
            changes += [Change("batch_size", cfg.batch_size, batch, why),
                        Change("gradient_accumulation", cfg.gradient_accumulation, accum, why)]
            out = dataclasses.replace(out, batch_size=batch, gradient_accumulation=accum)
    return out, changes


def apply_changes(values: dict, changes: list[Change]) -> dict:
    """The same changes on plain (flat) config values: what the wizard keeps and the Train tab shows."""
    return {**values, **{c.key: c.new for c in changes}}


def describe_changes(changes: list[Change], machine: Machine) -> str:
    """One line per change, for the Train tab (before Start) and the CLI; '' when nothing changes."""
    if not changes:
        return ""
    seen, lines = set(), []
    for c in changes:
        if c.why in seen and c.key == "gradient_accumulation":
            lines.append(f"- {c.key} {c.old} → {c.new}")
            continue
        seen.add(c.why)
        lines.append(f"- {c}")
    return f"On {machine.describe()}:\n" + "\n".join(lines)
