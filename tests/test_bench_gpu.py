"""The GPU benchmarks' steps on the CPU, at tiny sizes (scripts/gpu_check.sh runs them on a GPU at full size).

CUDA is out of reach here, so where a step reads it (peak memory, the context, the device name, synchronize)
torch.cuda's functions are faked with known values and the maths runs on the CPU: the step must report exactly
those readings. Everything else (the loops, FLOP counting, the tables, the refusals) runs for real."""
from __future__ import annotations

import json

import pytest
import torch

from sdstudio.train import measure
from sdstudio.train.bench_gpu import Row, Runner, format_table, rows_for, with_mfu
from sdstudio.train.measure import Probe, Spec
from train_helpers import make_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GB = 1024**3


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's readings, faked: 1.5 GB allocated / 2 GB reserved at peak, 0.5 GB of context, an H200."""
    calls = {"sync": 0, "reset": 0}
    fake = {
        "init": lambda: None,
        "mem_get_info": lambda *a: (140 * GB - int(0.5 * GB), 140 * GB),
        "memory_reserved": lambda *a: 0,
        "reset_peak_memory_stats": lambda *a: calls.__setitem__("reset", calls["reset"] + 1),
        "max_memory_allocated": lambda *a: int(1.5 * GB),
        "max_memory_reserved": lambda *a: 2 * GB,
        "synchronize": lambda *a: calls.__setitem__("sync", calls["sync"] + 1),
        "get_device_name": lambda *a: "NVIDIA H200",
    }
    for name, fn in fake.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    return calls


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("ds"), 4, size=(64, 64))


def _spec(variant, dataset, tmp_path, **kw):
    values = dict(variant=variant, base="tiny", dataset=str(dataset), out=str(tmp_path / variant),
                  preset="character-lora-sd15-8gb", sets=["resolution=64", "batch_size=2"], warmup=1, steps=3,
                  device="cpu")
    values.update(kw)
    return Spec(**values)


@pytest.mark.parametrize("variant", ["ours", "reference"])
def test_a_measured_run_reports_the_cuda_readings(variant, dataset, tmp_path, fake_cuda, tiny_dir):
    result = measure.measure(_spec(variant, dataset, tmp_path), probe=Probe("cuda"))
    assert result["peak_allocated_gb"] == pytest.approx(1.5) and result["peak_reserved_gb"] == pytest.approx(2.0)
    assert result["context_gb"] == pytest.approx(0.5)
    assert result["device_name"] == "NVIDIA H200"
    assert fake_cuda["reset"] >= 1  # the peak counts from the run's start
    assert fake_cuda["sync"] >= 2  # the clock reads after the device is done
    assert result["steps_timed"] == 3 and result["batch"] == 2 and result["resolution"] == 64
    assert result["samples_per_s"] == pytest.approx(2 * result["steps_per_s"]) and result["steps_per_s"] > 0
    assert result["rank"] == 16 and result["te_trains"] is False  # the 8 GB preset's LoRA, text encoder frozen

    out = with_mfu(dict(result, precision="bf16"), "tiny", peak=989.0)
    flops = measure.model_flops("tiny", 64, rank=16)
    assert out["flops_per_sample"] == flops
    assert out["mfu"] == pytest.approx(flops * result["samples_per_s"] / 989e12)
    assert with_mfu(dict(result, precision="fp32"), "tiny", peak=989.0)["mfu"] is None


def test_ours_runs_the_preset_through_the_loop(dataset, tmp_path, tiny_dir):
    result = measure.measure(_spec("ours", dataset, tmp_path, steps=2), probe=Probe("cpu"))
    log = (tmp_path / "ours" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3]  # warm-up + timed, through train/loop.py
    assert result["optimizer"] == "adamw" and result["gradient_checkpointing"] is False
    assert list((tmp_path / "ours").glob("*.safetensors"))  # the LoRA file, as `sdstudio train` writes it


def test_model_flops_of_the_real_sd15_lora_step(tmp_path):
    """One LoRA training sample of the real SD 1.5 UNet at 512 px, counted on the meta device (no memory)."""
    from sdstudio.models.families import SD1
    from sdstudio.models.loading import family_config_dir

    flops = measure.model_flops(str(family_config_dir(SD1)), 512, rank=16)
    assert 1.6e12 < flops < 1.85e12
    # FLOPs grow with the pixels (convolutions) and faster (attention over more tokens).
    small = measure.model_flops(str(family_config_dir(SD1)), 256, rank=16)
    assert 3.5 < flops / small < 5


def test_model_flops_are_cached_on_disk(monkeypatch, tiny_dir):
    first = measure.model_flops("tiny", 64, rank=4)
    monkeypatch.setattr(measure, "_count_flops", lambda *a: pytest.fail("counted again"))
    assert measure.model_flops("tiny", 64, rank=4) == first
    assert measure.peak_tflops("NVIDIA H100 PCIe") == 756.0 and measure.peak_tflops("NVIDIA H200") == 989.0
    assert measure.peak_tflops("Some GPU") is None


def test_rows_follow_the_presets_as_the_wizard_picks_them():
    rows = rows_for("sd15", [6, 8, 12, 24])
    assert [(r.memory_gb, r.preset) for r in rows] == [
        (None, "character-lora-sd15-8gb"),  # the throughput row (the MFU target) first, at batch 8
        (6, "character-lora-sd15-6gb"), (8, "character-lora-sd15-8gb"), (12, "character-lora-sd15-12gb")]
    assert rows[0].sets == ["batch_size=8"]  # and 24 GB picks the 12 GB preset, as the wizard does: measured once
    xl = rows_for("sdxl", [8, 12, 24])  # SDXL's own ladder (#15), at each preset's own resolution
    assert [(r.memory_gb, r.preset) for r in xl] == [
        (8, "character-lora-sdxl-8gb"), (12, "character-lora-sdxl-12gb"), (24, "character-lora-sdxl-24gb")]
    assert all("no sdxl preset" not in r.note for r in xl)


def test_a_refusal_comes_back_as_one_line(tmp_path, dataset, tiny_dir):
    """A setting this device cannot run (a CUDA-only attention kernel on the CPU) is refused in the child: the
    refusal is the row's error, one line, not a traceback."""
    spec = _spec("ours", dataset, tmp_path, sets=["resolution=64", "batch_size=2", "attention=sdpa_efficient"])
    got = measure.run_isolated(spec, timeout=300)
    assert got["error"].startswith("error: attention = sdpa_efficient needs a CUDA GPU"), got
    assert "\n" not in got["error"] and "Traceback" not in got["error"]


def test_runner_skips_past_its_budget(tmp_path, dataset):
    runner = Runner(budget_s=1e-9)
    got = runner(_spec("ours", dataset, tmp_path))
    assert got["error"] == "skipped: time budget spent"


def test_table_shows_ratios_and_errors():
    from sdstudio.train.bench_gpu import _ratios

    base = dict(arch="sd15", row="6 GB", preset="character-lora-sd15-6gb", batch=1, resolution=512, steps_per_s=4.0,
                peak_allocated_gb=3.0, peak_reserved_gb=3.5, device_name="NVIDIA H200", note="")
    results = [dict(base, variant="ours", option="ours", samples_per_s=6.0, steps_per_s=6.0, mfu=0.12),
               dict(base, variant="reference", option="reference", samples_per_s=4.0, peak_reserved_gb=7.0,
                    mfu=0.08),
               dict(arch="sdxl", row="6 GB", variant="ours", option="ours", preset="x", note="",
                    error="error: SDXL training is not supported yet")]
    _ratios(results, speed=False)
    assert results[0]["speed_ratio"] == pytest.approx(1.5) and results[0]["memory_ratio"] == pytest.approx(0.5)
    table = format_table(results)
    assert "12.0%" in table and "1.50" in table and "SDXL training is not supported yet" in table
    assert isinstance(Row("sd15", None, "p").label, str)


def test_a_cuda_out_of_memory_ends_the_job_as_failed_with_advice(dataset, tmp_path, tiny_dir):
    """What the gpu test provokes for real with a capped allocator: torch's CUDA OOM error from inside a training
    step, raised here by a method (no GPU to fill), ends the Job as Failed with one sentence of advice."""
    from sdstudio.events import Failed
    from sdstudio.jobs import JobManager
    from sdstudio.methods.registry import get_method
    from sdstudio.train.config import load_config
    from sdstudio.train.loop import train
    from train_helpers import fast_sets

    class Oom(get_method("lora")):
        def loss(self, c, batch, step):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                         "of 7.79 GiB of which 1.02 GiB is free.")

    cfg = load_config(None, fast_sets(dataset, tmp_path / "run", max_steps=2, sample_every=0,
                                      sample_prompts="[]"))
    job = JobManager().start("oom", "train", lambda ctx: train(cfg, ctx.emit, ctx.commands, method=Oom())).join(300)
    end = job.log.snapshot()["end"]
    assert isinstance(end, Failed)
    # The loop's own sentence (train.loop.OutOfMemory): what to change, and where Resume starts.
    assert end.message.startswith("Out of memory at step 1:") and "batch_size" in end.message
    assert "\n" not in end.message and "Resume" in end.message
