"""`sdstudio train` as a user runs it: a preset on a folder of images, one-line errors, and 2-process DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_helpers import make_images, make_kohya_dataset

ROOT = Path(__file__).resolve().parent.parent


def _run(args, timeout=300, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "sdstudio", *args], env=env, cwd=kw.get("cwd", ROOT),
                          capture_output=True, text=True, timeout=timeout)


def test_preset_on_a_folder_of_images(tmp_path):
    ds = make_images(tmp_path / "photos", 3, captions=False)  # plain photos: the preset's instance_prompt captions them
    out = tmp_path / "run"
    r = _run(["--home", str(tmp_path / "ws"), "train", "presets/character-lora-sd15.toml", "--set", "base_model=tiny",
              "--set", f"dataset={ds}",
              "--set", "max_steps=6", "--set", "resolution=64", "--set", f"output_dir={out}",
              "--set", "sample_steps=1"])
    assert r.returncode == 0, r.stderr
    assert "6/6" in r.stderr and "ETA" in r.stderr
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert all({"step", "loss", "lr", "time"} <= set(x) for x in lines)
    assert (out / "character-lora.safetensors").is_file() and (out / "config.toml").is_file()
    assert sorted(p.name for p in (out / "samples").iterdir())[:1] == ["step-000000-0.png"]
    # The CLI publishes like the Train tab: the LoRA is in the workspace's models/lora/, byte for byte.
    published = tmp_path / "ws" / "models" / "lora" / "character-lora.safetensors"
    assert published.read_bytes() == (out / "character-lora.safetensors").read_bytes()
    assert "published" in r.stderr


def test_wrong_folder_is_one_line_at_once(tmp_path):
    ds = make_kohya_dataset(tmp_path / "ds", n=2)
    for folder, words in [(ds / "img" / "2_sks person", "choose the dataset folder"),
                          (tmp_path / "missing", "does not exist"), (tmp_path, "dataset folder(s)")]:
        t = time.time()
        r = _run(["train", "character-lora-sd15", "--set", "base_model=tiny", "--set", f"dataset={folder}",
                  "--set", f"output_dir={tmp_path / 'run'}"])
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and words in r.stderr, r.stderr
        assert time.time() - t < 30  # no model was loaded: only Python start-up and imports
        assert not (tmp_path / "run" / "log.jsonl").exists()


def test_unknown_key_exits_2_naming_the_nearest(tmp_path):
    r = _run(["train", "character-lora-sd15", "--set", "max_step=5"])
    assert r.returncode == 2 and "max_steps" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.slow
def test_two_process_ddp_one_file_and_a_falling_loss(tmp_path):
    ds = make_kohya_dataset(tmp_path / "ds", n=4, repeats=2)
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    sets = ["base_model=tiny", f"dataset={ds}", "max_steps=30", "resolution=64", f"output_dir={out}",
            "sample_steps=1", "sample_every=0", "learning_rate=3e-3", "lr_scheduler=constant", "warmup_steps=0",
            "min_snr_gamma=0", "device=cpu"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "sdstudio",
                        "train", "character-lora-sd15", *sum((["--set", s] for s in sets), [])],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("saved ") == 1  # rank 0 alone reports and writes
    assert [p.name for p in out.glob("*.safetensors")] == ["character-lora.safetensors"]
    losses = [json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 30  # one line per step, not one per rank
    assert sum(losses[-10:]) < sum(losses[:10])
