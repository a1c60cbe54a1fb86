"""Exact resume: stop at step k, resume, and the loss sequence equals an uninterrupted run's; a run killed
with kill -9 resumes from its last checkpoint; --resume without a checkpoint says so."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdstudio.errors import UserError
from sdstudio.train.config import load_config
from sdstudio.train.loop import train
from train_helpers import fast_sets, make_kohya_dataset

ROOT = Path(__file__).resolve().parent.parent


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# Both runs in one fresh process: there, on one torch thread, they are bit-identical (checked under a CPU hog
# too). In a pytest worker that has run hundreds of tests before, two identical uninterrupted runs were seen to
# differ by ~1e-5 in a loss from step 3 on (a clean-clone `.ci/run` here; the state behind it was not found: not the
# resume, and not a test that runs just before this one), which a tolerance would have had to hide.
_RUNS = """
import sys
from pathlib import Path
from sdstudio.train.config import load_config
from sdstudio.train.loop import train
from train_helpers import fast_sets, make_kohya_dataset, train_until_stopped

tmp = Path(sys.argv[1])
ds = make_kohya_dataset(tmp / "ds", n=3)
# Every source of state: a schedule with warmup, EMA, caption shuffle/dropout, min-SNR, noise offset, accumulation.
opts = dict(max_steps=7, lr_scheduler="cosine", warmup_steps=2, ema="true", shuffle_captions="true",
            caption_dropout=0.3, min_snr_gamma=5, noise_offset=0.05, gradient_accumulation=2)
train(load_config(None, fast_sets(ds, tmp / "a", **opts)), lambda e: None)
resumed = load_config(None, fast_sets(ds, tmp / "b", **opts))
train_until_stopped(resumed, 3)
assert (tmp / "b" / "checkpoints" / "step-3" / "state.json").is_file()
train(resumed, lambda e: None, resume=True)
"""


def test_stop_and_resume_repeats_the_uninterrupted_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _RUNS, str(tmp_path)], env=env, cwd=str(ROOT), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 8))
    # Same data, noise, weights, optimizer, schedule, EMA and caption shuffle: bit for bit.
    assert [(r["loss"], r["lr"]) for r in b] == [(r["loss"], r["lr"]) for r in a]
    assert all(r2["time"] >= r1["time"] for r1, r2 in zip(b, b[1:]))  # time continues across the resume


def test_resume_without_checkpoint_says_so(tmp_path):
    ds = make_kohya_dataset(tmp_path / "ds", n=2)
    cfg = load_config(None, fast_sets(ds, tmp_path / "none"))
    with pytest.raises(UserError, match="no checkpoint"):
        train(cfg, lambda e: None, resume=True)


@pytest.mark.slow
def test_kill_9_then_resume(tmp_path):
    ds = make_kohya_dataset(tmp_path / "ds", n=2)
    run = tmp_path / "run"
    args = [sys.executable, "-m", "sdstudio", "train", "character-lora-sd15",
            *sum((["--set", s] for s in fast_sets(ds, run, max_steps=400, save_every=2)), [])]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "checkpoints" / "step-4").is_dir():
            time.sleep(0.1)
        assert (run / "checkpoints" / "step-4").is_dir(), "no checkpoint appeared"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # Finish quickly from the last checkpoint (max_steps lowered to just past it).
    from sdstudio.train.checkpoint import checkpoint_dirs

    last = checkpoint_dirs(run)[-1][0]
    done = subprocess.run(args + ["--set", f"max_steps={last + 2}", "--resume"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    steps = [r["step"] for r in _log(run)]
    assert steps == list(range(1, last + 3))
    assert (run / "character-lora.safetensors").is_file()
