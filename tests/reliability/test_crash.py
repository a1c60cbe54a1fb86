"""kill -9 during training, then resume: every run finishes, every file on disk loads, and the final LoRA and
log.jsonl equal those of a run that was never interrupted.

The fast test kills one run three times at the places that matter most (while caching latents, with a checkpoint
fully written but not yet swapped into place, in the middle of writing the LoRA), checking the disk after
each. `pytest -m soak` runs many seeded random kills (SDSTUDIO_SOAK_KILLS, default 24), some of them timed
kills from outside, and prints the tally.
"""
from __future__ import annotations

import os
import random
import time

import pytest

from crashes import (Tally, campaign, finish_child, random_kills, reference_trace, start_reference)
from train_helpers import make_kohya_dataset


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The dataset and an unbroken run (started in the background: the campaign runs beside it)."""
    work = tmp_path_factory.mktemp("crash")
    ds = make_kohya_dataset(work / "ds", n=4)
    proc = start_reference(ds, work / "ref")
    return work, ds, proc


def _wait_reference(reference):
    work, ds, proc = reference
    if proc.returncode is None:
        out = finish_child(proc, work / "ref" / "trace.txt")
        assert out.returncode == 0, out.stderr[-3000:]
    return work / "ref" / "run"


def test_kills_in_caching_checkpoint_and_lora_saves_resume_to_the_unbroken_run(reference):
    work, ds, _proc = reference
    tally = Tally()
    kills = [
        {"match": "fsync:cache:write", "n": 2, "torn": True},  # a latent half-written into the disk cache
        {"match": "replace:ckpt:swap", "n": 2},  # checkpoint step-4 complete in .step-4.<random>.tmp, not swapped
        {"match": "fsync:lora", "n": 1, "torn": True},  # the LoRA half-written, at the very end
    ]
    (work / "fast").mkdir()
    # The unbroken run goes on beside the kills; the comparison at the end waits for it.
    campaign(work / "fast", ds, lambda: _wait_reference(reference), kills, tally)
    assert tally.tried == 3 and tally.survived == 3, tally
    assert tally.where == ["fsync:cache:write", "replace:ckpt:swap", "fsync:lora"]


@pytest.mark.soak
def test_soak_many_seeded_kills(reference, capsys):
    work, ds, _proc = reference
    ref = _wait_reference(reference)
    trace = reference_trace(work / "ref")
    target = int(os.environ.get("SDSTUDIO_SOAK_KILLS", "24"))
    tally, seed, t0 = Tally(), 0, time.time()
    while tally.tried < target:
        seed += 1
        rng = random.Random(seed)
        kills = random_kills(rng, trace, n=rng.randint(3, 6), timed_share=0.2)
        campaign(work / f"soak-{seed}", ds, ref, kills, tally)
    with capsys.disabled():
        kinds = sorted({w.split(":")[0] + ":" + w.split(":")[1] if ":" in w else w for w in tally.where})
        print(f"\nsoak: kills survived/tried {tally.survived}/{tally.tried} in {tally.campaigns} campaigns "
              f"(seeds 1-{seed}), {time.time() - t0:.0f} s; kinds: {', '.join(kinds)}")
    assert tally.survived == tally.tried >= target
