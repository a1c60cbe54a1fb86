"""The CUDA paths (issue #18), run with `pytest -m gpu` on a CUDA machine (scripts/gpu_check.sh runs them):
mixed-precision training of every registered method, GradScaler skipping an overflowing step, 8-bit AdamW,
xformers when installed, an out-of-memory error ending a job as Failed with advice, a Playground stack of
4 LoRAs + 2 ControlNets + 1 T2I-Adapter at 512 and 1024 px on the full-size SD 1.5, and the Playground's
merged-weight budget read from CUDA's free memory.

`SDSTUDIO_GPU_TEST_DEVICE=cpu` dry-runs the tests that can run on a CPU (bf16 autocast, no GradScaler, no
8-bit Adam, no xformers), to check the tests themselves where no GPU is lent."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sdstudio.events import Failed, Step
from sdstudio.methods.registry import all_methods, get_method
from sdstudio.train.checkpoint import latest_checkpoint, load_checkpoint
from sdstudio.train.config import load_config
from sdstudio.train.loop import train
from train_helpers import fast_sets, make_kohya_dataset

DEVICE = os.environ.get("SDSTUDIO_GPU_TEST_DEVICE", "cuda")
CUDA = DEVICE.startswith("cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(CUDA and not torch.cuda.is_available(), reason="needs a CUDA GPU")]
needs_cuda = pytest.mark.skipif(not CUDA, reason="a CUDA-only path")


def _sets(ds, out, **kw):
    return fast_sets(ds, out, device=DEVICE, **kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_kohya_dataset(tmp_path_factory.mktemp("ds"), n=2, with_reg=True)


# -- training ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("name", sorted(all_methods()))
def test_every_method_trains_in_mixed_precision(name, precision, dataset, tmp_path, tiny_dir):
    """fp16/bf16 autocast with fp32 trainable weights; fp16 goes through a GradScaler, whose state the
    checkpoint keeps (a resume must not restart the loss scale)."""
    if precision == "fp16" and not CUDA:
        pytest.skip("fp16 training needs a GPU")
    extra = dict(getattr(all_methods()[name], "contract_settings", {}))
    cfg = load_config(None, _sets(dataset, tmp_path / "run", method=name, precision=precision, max_steps=3,
                                  learning_rate=1e-3, sample_every=0, **extra))
    events = []
    outputs = train(cfg, events.append)
    losses = [e.loss for e in events if isinstance(e, Step)]
    assert len(losses) == 3 and all(np.isfinite(losses)), losses
    assert outputs and all(p.exists() for p in outputs)
    state, trainable, _ema, extra_state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert state.step == 3
    weights = [t for t in trainable.values() if t.is_floating_point()]  # (pivotal also keeps an int: its phase)
    assert weights and all(t.dtype == torch.float32 for t in weights)  # master weights stay fp32
    if precision == "fp16":
        assert extra_state["scaler"]["scale"] > 0
    else:
        assert "scaler" not in extra_state  # bf16 has fp32's range: no loss scaling


@needs_cuda
def test_gradscaler_skips_an_overflowing_step(dataset, tmp_path, tiny_dir):
    """An inf gradient at the first step: the scaler skips that update (the weights stay as they were) and
    halves its scale; the next steps train."""
    Lora = get_method("lora")

    class OverflowOnce(Lora):
        def prepare(self, c, cfg):
            groups = super().prepare(c, cfg)
            self.params = [p for g in groups for p in g.params]
            self.initial = [p.detach().float().clone() for p in self.params]
            self.first = True
            self.params[0].register_hook(lambda g: torch.full_like(g, float("inf")) if self.first else g)
            return groups

        def on_step_end(self, c, step):
            if step == 0:  # after the first optimizer step, which the scaler must have skipped
                self.unchanged = all(torch.equal(p.detach().float(), i) for p, i in zip(self.params, self.initial))
                self.first = False

    method = OverflowOnce()
    cfg = load_config(None, _sets(dataset, tmp_path / "run", precision="fp16", max_steps=3, learning_rate=1e-2))
    events = []
    train(cfg, events.append, method=method)
    assert method.unchanged  # the overflowing step changed nothing, weight decay included
    assert any(not torch.equal(p.detach().float(), i) for p, i in zip(method.params, method.initial))  # later ones did
    assert all(np.isfinite([e.loss for e in events if isinstance(e, Step)]))
    _state, _t, _e, extra_state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert extra_state["scaler"]["scale"] == 65536.0 / 2  # GradScaler's start, halved once


@needs_cuda
def test_adamw8bit_keeps_8bit_state(dataset, tmp_path, tiny_dir):
    pytest.importorskip("bitsandbytes")
    # Rank 64: bitsandbytes keeps tensors under 4096 values in 32 bits; these LoRA tensors are larger.
    cfg = load_config(None, _sets(dataset, tmp_path / "run", optimizer="adamw8bit", max_steps=3, precision="bf16",
                                  **{"lora.rank": 64, "lora.targets": "attention_mlp"}))
    events = []
    train(cfg, events.append)
    assert all(np.isfinite([e.loss for e in events if isinstance(e, Step)]))
    _s, _t, _e, extra_state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    dtypes = {v.dtype for st in extra_state["optimizer"]["state"].values() for k, v in st.items()
              if k.startswith("state") and torch.is_tensor(v)}
    assert torch.uint8 in dtypes, dtypes


@needs_cuda
def test_xformers_attention_trains(dataset, tmp_path, tiny_dir):
    from sdstudio.devices import has_xformers

    if not has_xformers():
        pytest.skip("xformers is not installed")
    Lora = get_method("lora")
    seen = set()

    class Spy(Lora):
        def on_step_end(self, c, step):
            seen.update(type(p).__name__ for p in c.unet.attn_processors.values())

    cfg = load_config(None, _sets(dataset, tmp_path / "run", attention="xformers", precision="fp16", max_steps=2))
    train(cfg, lambda e: None, method=Spy())
    assert seen and all("XFormers" in name for name in seen), seen


@needs_cuda
def test_out_of_memory_ends_the_job_as_failed_with_advice(dataset, tmp_path, tiny_dir):
    """The allocator capped at 0.2% of the GPU (~280 MB of an H200): the tiny model loads, 1024 px images do not fit."""
    from sdstudio.jobs import JobManager

    cfg = load_config(None, _sets(dataset, tmp_path / "run", resolution=1024, batch_size=8, max_steps=2,
                                  precision="fp16", cache_latents="off", buckets="false"))
    torch.cuda.empty_cache()
    held_before = torch.cuda.memory_allocated()
    torch.cuda.set_per_process_memory_fraction(0.002)
    try:
        job = JobManager().start("oom", "train", lambda ctx: train(cfg, ctx.emit, ctx.commands)).join(600)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    end = job.log.snapshot()["end"]
    assert isinstance(end, Failed), end
    assert "ran out of memory" in end.message and "batch size" in end.message and "checkpointing" in end.message
    assert "\n" not in end.message and "Traceback" not in end.message
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() <= held_before + 50 * 2**20  # the job let go of what it held


# -- the Playground on the full-size SD 1.5 ------------------------------------------------------------------------

class _BenchmarkBase:
    """The Playground's cache seam, handing it the full-size random model (load_base refuses that model to
    everything but benchmarks and these tests)."""

    def take(self, ref, device="cpu", dtype=None):
        from sdstudio.models.loading import load_base

        return load_base(ref, device=device, dtype=dtype, benchmark=True)


@pytest.fixture(scope="module")
def stack_files(sd15_full, tmp_path_factory):
    """4 kohya LoRAs (rank 16, attention and text encoder), 2 ControlNets and 1 T2I-Adapter sized for SD 1.5."""
    from diffusers import ControlNetModel, T2IAdapter, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdstudio.formats.safe_io import save_safetensors
    from sdstudio.playground.bench import random_kohya_lora

    root = tmp_path_factory.mktemp("stack")
    dev = DEVICE
    unet = UNet2DConditionModel.from_pretrained(str(sd15_full / "unet"), torch_dtype=torch.float16).to(dev)
    with torch.device("meta"):  # the LoRAs only need its shapes
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(str(sd15_full / "text_encoder")))
    files = {"lora": [save_safetensors({k: v.half() if v.ndim else v for k, v in
                                        random_kohya_lora(unet, te, 16, i, attention_only=True).items()},
                                       root / f"lora{i}.safetensors") for i in range(4)],
             "controlnet": [], "image": root / "control.png"}
    for i in range(2):
        torch.manual_seed(i)
        with torch.device(dev):
            cn = ControlNetModel.from_unet(unet)
        cn.to(torch.float16).save_pretrained(str(root / f"cn{i}"))
        files["controlnet"].append(root / f"cn{i}")
        del cn
    with torch.device(dev):
        adapter = T2IAdapter(in_channels=3, channels=[320, 640, 1280, 1280], num_res_blocks=2, downscale_factor=8,
                             adapter_type="full_adapter")
    adapter.to(torch.float16).save_pretrained(str(root / "t2i"))
    files["t2i"] = root / "t2i"
    rng = np.random.default_rng(0)
    Image.fromarray((np.kron(rng.random((16, 16, 3)), np.ones((64, 64, 1))) * 255).astype(np.uint8)).save(
        files["image"])
    del unet, te
    torch.cuda.empty_cache()
    return files


def _recipe(files, base, size, **kw):
    from sdstudio.playground.recipe import ControlNetItem, LoraItem, Recipe, T2IAdapterItem

    return Recipe(base_model=str(base), prompt="a (photo:1.1) of a dog", steps=4, width=size, height=size,
                  sampler="dpm++2m_karras", cfg=6.0, seed=7,
                  lora=[LoraItem(str(f), 0.4 + 0.1 * i) for i, f in enumerate(files["lora"])],
                  controlnet=[ControlNetItem(str(p), image=str(files["image"]), weight=0.6) for p in files["controlnet"]],
                  t2i_adapter=[T2IAdapterItem(str(files["t2i"]), image=str(files["image"]), weight=0.5)], **kw)


@needs_cuda
@pytest.mark.parametrize("size", [512, 1024])
def test_four_loras_two_controlnets_and_an_adapter_on_full_size_sd15(size, sd15_full, stack_files):
    from sdstudio.playground.session import Playground

    pg = Playground(device=DEVICE, dtype=torch.float16, cache=_BenchmarkBase())
    torch.cuda.reset_peak_memory_stats()
    recipe = _recipe(stack_files, sd15_full, size)
    img = np.asarray(pg.run(recipe)[0])
    assert img.shape == (size, size, 3) and img.std() > 1  # random weights draw noise, but not a flat image
    plain = np.asarray(pg.run(recipe.replace(lora=[], controlnet=[], t2i_adapter=[]))[0])
    assert np.abs(img.astype(np.int16) - plain.astype(np.int16)).mean() > 1  # the stack changed the picture
    print(f"{size} px: peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GB allocated")


@needs_cuda
def test_merged_weight_budget_follows_free_cuda_memory(sd15_full, stack_files):
    """The unfused stack keeps merged weights within half of what CUDA has free beyond 3 GiB, read at each
    weight change. With the GPU filled to leave little beyond that headroom the budget is small (layers past it
    merge per call), and the picture is the one drawn with no merged weights kept at all."""
    from dataclasses import replace

    from sdstudio.playground.session import Playground
    from sdstudio.playground.stack import MergedWeights

    cuda = torch.device("cuda", torch.cuda.current_device())  # the key MergedWeights keeps budgets under
    pg = Playground(device=DEVICE, dtype=torch.float16, cache=_BenchmarkBase())
    recipe = _recipe(stack_files, sd15_full, 512).replace(controlnet=[], t2i_adapter=[])

    def weights(delta):
        return recipe.replace(lora=[replace(item, weight=item.weight + delta) for item in recipe.lora])

    pg.run(recipe)
    merged = pg.stack.merged
    roomy = merged.budget(cuda)
    assert 0 < merged.used <= roomy  # plenty free: every covered layer keeps its merged weight
    free, _ = torch.cuda.mem_get_info()
    assert roomy <= merged.used + max(0, free - MergedWeights.CUDA_HEADROOM) // 2 + 2**30

    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    filler = torch.empty(max(0, free - MergedWeights.CUDA_HEADROOM - 3 * 2**29), dtype=torch.uint8, device="cuda")
    try:
        tight = np.asarray(pg.run(weights(0.05))[0]).astype(np.int16)
        assert merged.used <= merged.budget(cuda) < 2**30, (merged.used, merged.budget(cuda))
        merged.limit_bytes = 0  # keep nothing: each layer merges per call
        pg.run(weights(0.1))
        reference = np.asarray(pg.run(weights(0.05))[0]).astype(np.int16)
        assert merged.used == 0
    finally:
        del filler
        torch.cuda.empty_cache()
    assert np.abs(tight - reference).mean() < 8  # half-precision rounding differs between the two paths
