"""One function decides the machine-dependent settings (optimizer, precision, attention, batch) and says what it
changed; the plan on a CPU says so and times a measured step; the FLOP constants behind it are recounted."""
from __future__ import annotations

import dataclasses

import pytest

from sdstudio.train.config import load_config
from sdstudio.train.estimate import UNET_FORWARD_GFLOPS, cpu_estimate
from sdstudio.train.machine import Machine, apply_changes, describe_changes, fit_to_machine

CPU = Machine("cpu")
CUDA_NO_BNB = Machine("cuda", gpu_name="GeForce GTX 1660", memory_gb=6, bf16=False)
CUDA_FULL = Machine("cuda", gpu_name="GeForce RTX 4090", memory_gb=24, bitsandbytes=True, xformers=True, bf16=True)


def test_the_6gb_preset_on_a_cpu_trains_with_adamw_and_says_why():
    cfg = load_config("character-lora-sd15-6gb")
    fitted, changes = fit_to_machine(cfg, CPU)
    assert [(c.key, c.old, c.new) for c in changes] == [("optimizer", "adamw8bit", "adamw")]
    assert "8-bit Adam needs a CUDA GPU" in changes[0].why
    assert fitted.optimizer == "adamw" and cfg.optimizer == "adamw8bit"  # the input is not modified
    text = describe_changes(changes, CPU)
    assert text.startswith("On the CPU") and "optimizer adamw8bit → adamw" in text
    assert apply_changes({"optimizer": "adamw8bit", "rank": 4}, changes) == {"optimizer": "adamw", "rank": 4}


def test_each_machine_setting_is_decided_here():
    cfg = load_config(None, extra={"optimizer": "adamw8bit", "precision": "bf16", "attention": "xformers"})
    _f, changes = fit_to_machine(cfg, CUDA_NO_BNB)
    got = {c.key: c.new for c in changes}
    assert got == {"optimizer": "adamw", "precision": "fp16", "attention": "sdpa"}
    assert "bitsandbytes" in next(c.why for c in changes if c.key == "optimizer")
    # A machine that has everything changes nothing.
    assert fit_to_machine(cfg, CUDA_FULL)[1] == []
    # fp16 asked on a CPU becomes fp32 (pick_dtype would refuse it).
    assert {c.key: c.new for c in fit_to_machine(dataclasses.replace(cfg, precision="fp16"), CPU)[1]}["precision"] \
        == "fp32"


def test_batch_is_split_into_accumulation_when_it_does_not_fit():
    cfg = load_config("character-lora-sd15-12gb")  # batch 2, no gradient checkpointing: ~10.9 GB
    small = Machine("cuda", gpu_name="GeForce RTX 3060 Ti", memory_gb=8, bitsandbytes=True, bf16=True)
    fitted, changes = fit_to_machine(cfg, small)
    assert (fitted.batch_size, fitted.gradient_accumulation) == (1, 2)  # the same 2 images per step
    assert {c.key for c in changes} == {"batch_size", "gradient_accumulation"}
    assert fit_to_machine(cfg, CUDA_FULL)[0].batch_size == 2


def test_the_cpu_plan_is_timed_from_a_measured_step(tiny_dir):
    cfg = load_config(None, extra={"max_steps": 30, "resolution": 64, "sample_every": 0, "sample_steps": 2})
    est = cpu_estimate(cfg)
    assert est.on_cpu and est.sec_per_step > 0 and est.minutes > 0
    assert "on the CPU" in est.summary() and "GB of GPU memory" not in est.summary()
    assert "measured" in est.summary()
    # Above the measured size, twice the pixels per side is four times the work (the measured step, scaled).
    at128 = cpu_estimate(dataclasses.replace(cfg, resolution=128))
    at256 = cpu_estimate(dataclasses.replace(cfg, resolution=256))
    assert at256.sec_per_step / at128.sec_per_step == pytest.approx(4)
    real = cpu_estimate(load_config("character-lora-sd15-8gb"))  # SD 1.5 at 512 px: seconds to minutes a step
    assert real.sec_per_step > 1 and "measured speed" in real.summary()


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_unet_flops_constants_match_a_count(family):
    """The constants the CPU plan uses equal a FLOP count of the family's UNet built on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from sdstudio.models.families import get_family

    fam = get_family(family)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**fam.unet)
        x = torch.zeros(1, 4, 64, 64)
        ctx = torch.zeros(1, 77, unet.config.cross_attention_dim)
    with FlopCounterMode(display=False) as fc:
        unet(x, torch.tensor([10], device="meta"), ctx)
    assert fc.get_total_flops() / 1e9 == pytest.approx(UNET_FORWARD_GFLOPS[family], rel=0.01)
