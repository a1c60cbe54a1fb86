"""The loop's safety nets: NaN stops with a clear message and keeps the last good checkpoint; Stop works
during caching; pause blocks; sample-now and save-now act at the next step; Prodigy/Lion/Adafactor run."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from sdstudio.errors import UserError
from sdstudio.events import Preview, Progress, Saved, Status, Step
from sdstudio.jobs import Commands, Stopped
from sdstudio.methods.lora import Lora
from sdstudio.train.config import load_config
from sdstudio.train.loop import train
from train_helpers import fast_sets, make_images, make_kohya_dataset


class NaNAfterTwoSteps(Lora):
    """A plug-in method (not a mock of the loop): its loss turns NaN at the third step, as a diverging run's would."""

    def loss(self, c, batch, step):
        loss = super().loss(c, batch, step)
        return loss * float("nan") if step >= 2 else loss


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    ds = make_kohya_dataset(tmp_path / "ds", n=2)
    cfg = load_config(None, fast_sets(ds, tmp_path / "run", max_steps=6, save_every=2))
    with pytest.raises(UserError, match=r"loss became nan at step 3: lower the learning rate.*step 2"):
        train(cfg, lambda e: None, method=NaNAfterTwoSteps())
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-2"]
    assert not (tmp_path / "run" / "my-lora.safetensors").exists()
    cfg2 = load_config(None, fast_sets(ds, tmp_path / "run", max_steps=4, save_every=2))
    train(cfg2, lambda e: None, resume=True)  # the kept checkpoint resumes
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 4


def test_stop_works_during_caching(tmp_path):
    ds = make_images(tmp_path / "ds", 24)
    cfg = load_config(None, fast_sets(ds, tmp_path / "run", cache_latents="disk"))
    commands = Commands()
    events = []

    def emit(ev):
        events.append(ev)
        if isinstance(ev, Progress) and ev.stage == "cache":
            commands.stop()

    t = time.time()
    with pytest.raises(Stopped):
        train(cfg, emit, commands)
    cached = list((tmp_path / "run" / "cache" / "latents").glob("*.safetensors"))
    assert len(cached) < 24  # it stopped in the middle, not after
    assert not any(isinstance(e, Step) for e in events)
    assert time.time() - t < 60


def test_pause_sample_now_save_now(tmp_path):
    ds = make_kohya_dataset(tmp_path / "ds", n=2)
    cfg = load_config(None, fast_sets(ds, tmp_path / "run", max_steps=6))
    commands = Commands()
    events = []
    paused_at = {}

    def emit(ev):
        events.append(ev)
        if isinstance(ev, Step) and ev.step == 2:
            commands.pause()
            commands.request("sample")
            commands.request("save")
            paused_at["t"] = time.time()
            threading.Timer(1.0, commands.resume).start()

    train(cfg, emit, commands)
    steps = [e for e in events if isinstance(e, Step)]
    assert steps[2].t - paused_at["t"] >= 0.9  # step 3 waited for the resume
    assert any(isinstance(e, Status) and e.stage == "paused" for e in events)
    assert any(isinstance(e, Preview) and e.step == 2 for e in events)
    assert any(isinstance(e, Saved) and e.kind == "checkpoint" and e.step == 2 for e in events)


@pytest.mark.parametrize("optimizer,lr", [("prodigy", 1.0), ("lion", 1e-4), ("adafactor", 1e-4)])
def test_other_optimizers_train(tmp_path, optimizer, lr):
    ds = make_kohya_dataset(tmp_path / "ds", n=2)
    cfg = load_config(None, fast_sets(ds, tmp_path / "run", max_steps=2, optimizer=optimizer, learning_rate=lr,
                                      sample_prompts="[]", lr_scheduler="cosine", warmup_steps=1))
    events = []
    train(cfg, events.append)
    assert [e.step for e in events if isinstance(e, Step)] == [1, 2]


def test_adamw8bit_on_cpu_is_a_clear_error(tmp_path):
    ds = make_kohya_dataset(tmp_path / "ds", n=2)
    cfg = load_config(None, fast_sets(ds, tmp_path / "run", optimizer="adamw8bit"))
    with pytest.raises(UserError, match="adamw8bit needs a CUDA GPU"):
        train(cfg, lambda e: None)


def test_v_prediction_and_prior_preservation_train(tmp_path):
    ds = make_kohya_dataset(tmp_path / "ds", n=2, with_reg=True)
    cfg = load_config(None, fast_sets(ds, tmp_path / "run", max_steps=2, prediction_type="v_prediction",
                                      prior_preservation="true", prior_loss_weight=0.5, sample_prompts="[]",
                                      batch_size=2, buckets="false"))
    events = []
    train(cfg, events.append)
    assert all(torch.isfinite(torch.tensor(e.loss)) for e in events if isinstance(e, Step))
    assert '"prior_preservation": true' in __import__("sdstudio.formats.safe_io", fromlist=["x"]).read_safetensors_metadata(
        tmp_path / "run" / "my-lora.safetensors")["sdstudio.run_card"]


@pytest.mark.gpu
def test_fp16_mixed_precision_with_8bit_adam_and_xformers_on_cuda(tmp_path):
    """On a CUDA GPU: fp16 autocast with fp32 LoRA weights, 8-bit AdamW, xformers when installed."""
    ds = make_kohya_dataset(tmp_path / "ds", n=2)
    cfg = load_config(None, fast_sets(ds, tmp_path / "run", device="cuda", precision="fp16", optimizer="adamw8bit",
                                      max_steps=3, gradient_checkpointing="true"))
    events = []
    train(cfg, events.append)
    assert [e.step for e in events if isinstance(e, Step)] == [1, 2, 3]
