"""Out of memory, simulated: a step (or a denoising call) raises torch.OutOfMemoryError, the exception a CUDA
allocator raises. There is no GPU here, so raising it is the one fake in this file; everything around it (the
loop, the Job, the checkpoint, the resume, the Playground session) is the real code.

Training ends with a Failed event that says what to change and where Resume continues, keeps a checkpoint of
the last finished step, and resumes to the end. Generation ends with a Failed event with advice for generating,
writes no partial image, and the session generates normally afterwards.
"""
from __future__ import annotations

import json

import pytest
import torch

from sdstudio.events import Failed, Finished
from sdstudio.jobs import JobManager
from sdstudio.methods.lora import Lora
from sdstudio.train.checkpoint import checkpoint_dirs
from sdstudio.train.config import load_config
from sdstudio.train.loop import train
from train_helpers import fast_sets, make_kohya_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class RunsOutOfMemory(Lora):
    """The LoRA method, whose loss raises CUDA's OOM error when computing step `at` (1-based)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def loss(self, c, batch, step):
        if step + 1 == self.at:
            raise OOM("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)")
        return super().loss(c, batch, step)


@pytest.mark.parametrize("save_every", [2, 0])
def test_training_oom_fails_with_advice_and_stays_resumable(tmp_path, save_every):
    ds = make_kohya_dataset(tmp_path / "ds", n=2)
    run = tmp_path / "run"
    cfg = load_config("character-lora-sd15", fast_sets(ds, run, max_steps=5, save_every=save_every))
    job = JobManager().start("run", "train", lambda ctx: train(cfg, ctx.emit, ctx.commands, method=RunsOutOfMemory(4)))
    job.join(600)
    end = job.log.snapshot()["end"]
    assert isinstance(end, Failed), end
    text = end.message
    for advice in ("gradient_checkpointing", "caches", "batch_size", "smaller preset", "Resume"):
        assert advice in text, (advice, text)
    assert "\n" not in text and "Traceback" not in text
    # The step that failed changed nothing: the last finished one (3) is kept, saved at the failure (the periodic
    # checkpoints reached step 2, or nothing at all).
    assert [s for s, _ in checkpoint_dirs(run)] == ([2, 3] if save_every == 2 else [3])
    assert "continues from step 3" in text

    cfg = load_config("character-lora-sd15", fast_sets(ds, run, max_steps=5, save_every=save_every,
                                                      gradient_checkpointing="true"))
    job = JobManager().start("run", "train", lambda ctx: train(cfg, ctx.emit, ctx.commands, resume=True))
    job.join(600)
    assert isinstance(job.log.snapshot()["end"], Finished)
    steps = [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert (run / "character-lora.safetensors").is_file()


def test_generation_oom_fails_with_advice_and_the_session_recovers(tmp_path, monkeypatch):
    from sdstudio.playground.recipe import Recipe
    from sdstudio.playground.session import Playground, generation_work

    session = Playground(device="cpu")
    recipe = Recipe(prompt="a cat", steps=2, width=64, height=64, sampler="euler", seed=1)
    unet = session.base("tiny").unet
    real_forward = unet.forward
    calls = {"n": 0}

    def forward(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second denoising call: half-way through the image
            raise OOM("CUDA out of memory. Tried to allocate 512.00 MiB")
        return real_forward(*a, **kw)

    monkeypatch.setattr(unet, "forward", forward)
    out = tmp_path / "outputs"
    jobs = JobManager()
    job = jobs.start("playground", "generate", generation_work(session, recipe, out)).join(300)
    end = job.log.snapshot()["end"]
    assert isinstance(end, Failed) and "\n" not in end.message, end
    for advice in ("width/height", "batch", "ControlNets", "training"):
        assert advice in end.message, (advice, end.message)
    assert not out.exists() or not any(out.iterdir()), "a partial image was written"

    monkeypatch.undo()
    job = jobs.start("playground", "generate", generation_work(session, recipe, out)).join(300)
    assert isinstance(job.log.snapshot()["end"], Finished), job.log.snapshot()["end"]
    assert len(list(out.glob("*.png"))) == 1


def test_out_of_memory_is_recognised_in_all_its_forms():
    from sdstudio.devices import is_out_of_memory

    assert is_out_of_memory(OOM("CUDA out of memory"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not an allocator's error type
