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

from crashes import Tally, campaign, random_kills, shared_reference


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The dataset and the unbroken run (in the background: the campaign runs beside it)."""
    return shared_reference(tmp_path_factory)


@pytest.mark.slow
def test_kills_in_caching_checkpoint_and_lora_saves_resume_to_the_unbroken_run(reference, tmp_path):
    work, ds = tmp_path, reference.ds
    tally = Tally()
    kills = [
        {"match": "fsync:cache:write", "n": 2, "torn": True},  # a latent half-written into the disk cache
        {"match": "replace:ckpt:swap", "n": 2},  # checkpoint step-4 complete in .step-4.<random>.tmp, not swapped
        {"match": "fsync:lora", "n": 1, "torn": True},  # the LoRA half-written, at the very end
    ]
    (work / "fast").mkdir()
    # The unbroken run goes on beside the kills; the comparison at the end waits for it.
    campaign(work / "fast", ds, reference.run, kills, tally)
    assert tally.tried == 3 and tally.survived == 3, tally
    assert tally.where == ["fsync:cache:write", "replace:ckpt:swap", "fsync:lora"]


@pytest.mark.soak
def test_soak_many_seeded_kills(reference, tmp_path, capsys):
    work, ds = tmp_path, reference.ds
    ref, trace = reference.run(), reference.trace()
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
