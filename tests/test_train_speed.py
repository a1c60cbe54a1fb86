"""The speed options (train/speed.py) change no maths: each trains the same losses as a run without it, and
the modules come back as they were. Whether each is faster is for `sdstudio bench train --speed` on a GPU."""
from __future__ import annotations

import json

import pytest
import torch

from sdstudio.errors import UserError
from sdstudio.train.config import load_config
from sdstudio.train.loop import train
from train_helpers import fast_sets, make_kohya_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_kohya_dataset(tmp_path_factory.mktemp("ds"), n=2)


@pytest.fixture(scope="module")
def baseline(dataset, tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("base")
    train(load_config(None, fast_sets(dataset, out, max_steps=3, sample_every=0)), lambda e: None)
    return _losses(out)


# On the CPU: cudnn_benchmark and cache_on_gpu run their code paths with nothing to change; torch.compile uses
# dynamo's "eager" backend (an inductor build of the tiny UNet would take minutes on 2 cores).
@pytest.mark.parametrize("option", ["channels_last=true", "compile_unet=true", "attention=sdpa_math",
                                    "attention=sdpa_flash", "cudnn_benchmark=true", "fused_optimizer=false",
                                    "cache_on_gpu=true"])
def test_each_speed_option_trains_the_same_losses(option, dataset, baseline, tmp_path, monkeypatch):
    from sdstudio.train import speed

    monkeypatch.setattr(speed, "COMPILE_KWARGS", {"backend": "eager"})
    seen = {}
    real_restore = speed.SpeedOptions.restore

    def spy_restore(self):
        seen.setdefault("compiled", self.c.unet._compiled_call_impl is not None)
        seen.setdefault("channels_last", self.c.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last))
        real_restore(self)
        seen["after"] = (self.c.unet._compiled_call_impl, self.c.unet.conv_in.weight.is_contiguous(),
                         torch.backends.cudnn.benchmark)

    monkeypatch.setattr(speed.SpeedOptions, "restore", spy_restore)
    cudnn_before = torch.backends.cudnn.benchmark
    from torch._dynamo.utils import counters

    from sdstudio.events import Step

    counters.clear()
    traced = {}  # frames torch.compile had traced when each step ended

    def on_event(ev):
        if isinstance(ev, Step):
            traced[ev.step] = counters["frames"]["total"]

    # A first preview (step 0) and a last one (step 3) around three steps.
    outputs = train(load_config(None, fast_sets(dataset, tmp_path, max_steps=3, sample_every=0) + [option]),
                    on_event)
    assert outputs and all(p.exists() for p in outputs)
    assert _losses(tmp_path) == pytest.approx(baseline, rel=1e-4, abs=1e-6)
    assert seen["compiled"] == (option == "compile_unet=true")
    if option == "compile_unet=true":
        # The UNet is traced in the first step and never again: not for the previews (run uncompiled), nor for
        # the adapters' parameter list (made at plan time, not at the first call). Each of those used to trace
        # the whole UNet again (4 traces in this run; minutes each with CUDA's inductor).
        assert traced[1] > 0 and traced[3] == traced[1] == counters["frames"]["total"], (traced, dict(counters))
    assert seen["channels_last"] == (option == "channels_last=true")
    assert seen["after"] == (None, True, cudnn_before)  # put back before the files are written


def test_cuda_only_kernels_are_refused_in_one_sentence_on_the_cpu(dataset, tmp_path):
    for kernel in ("sdpa_efficient", "sdpa_cudnn", "xformers"):
        cfg = load_config(None, fast_sets(dataset, tmp_path, attention=kernel))
        with pytest.raises(UserError, match=f"attention = {kernel} needs a CUDA GPU"):
            train(cfg, lambda e: None)
