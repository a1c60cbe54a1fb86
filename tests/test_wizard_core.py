"""The wizard headless: checks that refuse before anything heavy, the whole run on tiny (dataset, captions,
LoRA in models/lora, grid, stage events), stop, and 'train again with more steps'."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pathlib import Path
from PIL import Image

from sdstudio.errors import UserError
from sdstudio.events import Failed, Finished, Preview, Saved, Status, Step
from sdstudio.jobs import run_foreground
from sdstudio.workspace import Workspace
from sdstudio import wizard
from sdstudio.wizard import QuickConfig, plan, quick_work
from wizard_helpers import make_photos

FAST = dict(base_model="tiny", max_steps=3, resolution=64, sample_steps=1, sample_every=0, captioner="none",
            device="cpu")


@pytest.fixture
def ws(tmp_path):
    return Workspace.open(tmp_path / "ws")


@pytest.mark.parametrize("change,match", [
    (dict(name=""), "name is empty"),
    (dict(name="two words"), "one word"),
    (dict(name="person"), "class word"),
    (dict(class_word=""), "class is empty"),
    (dict(memory_gb=4), "too little"),
    (dict(memory_gb="lots"), "not a number"),
    (dict(preset="character-lora-sd15-12gb", memory_gb=8), "use character-lora-sd15-8gb"),
    (dict(preset="nope"), "no preset"),
])
def test_plan_refuses_with_one_sentence(ws, tmp_path, change, match):
    photos = make_photos(tmp_path / "p", 6)
    qc = QuickConfig(**{"photos": photos, "name": "mira", "class_word": "woman", **FAST, **change})
    with pytest.raises(UserError, match=match) as err:
        plan(qc, ws, device_is_cuda=True)
    assert str(err.value).replace("e.g. ", "").count(". ") == 0 and str(err.value).endswith(".")  # one sentence
    assert not any((ws.root / "runs").iterdir()) and not any((ws.root / "datasets").iterdir())


def test_too_few_photos_and_warnings(ws, tmp_path):
    with pytest.raises(UserError, match="Only 3 photo"):
        plan(QuickConfig(photos=make_photos(tmp_path / "few", 3), name="mira", class_word="woman", **FAST), ws)
    photos = make_photos(tmp_path / "p", 6)
    Image.new("RGB", (40, 40), "red").save(tmp_path / "p" / "tiny.png")
    (tmp_path / "p" / "copy.png").write_bytes(photos[0].read_bytes())
    p = plan(QuickConfig(photos=[tmp_path / "p"], name="mira", class_word="woman", **FAST), ws, device_is_cuda=False)
    text = " ".join(p.warnings)
    assert "under 64 px" in text and "tiny.png" in text and "duplicate" in text and "copy.png" in text
    assert "8-bit Adam" not in " ".join(p.notes)  # the 8 GB preset uses AdamW anyway
    p6 = plan(QuickConfig(photos=photos, name="mira", class_word="woman", **{**FAST, "memory_gb": 6}), ws,
              device_is_cuda=False)
    assert p6.preset == "character-lora-sd15-6gb" and p6.values["optimizer"] == "adamw"
    assert any("8-bit Adam" in n for n in p6.notes)
    assert plan(QuickConfig(photos=photos, name="mira", class_word="woman", **{**FAST, "memory_gb": 24}), ws
                ).preset == "character-lora-sd15-12gb"


def test_choices_follow_the_class(ws, tmp_path):
    photos = make_photos(tmp_path / "p", 6)
    got = {c: plan(QuickConfig(photos=photos, name="mira", class_word=c, **{**FAST, "captioner": "auto"}), ws)
           for c in ("woman", "anime character", "dog", "style")}
    assert (got["woman"].crop, got["woman"].captioner) == ("face", "blip")
    assert (got["anime character"].crop, got["anime character"].captioner) == ("face", "wd14")
    assert got["anime character"].values["shuffle_captions"] is True
    assert got["dog"].crop == "centre" and got["style"].crop == "bucket"
    assert got["woman"].values["instance_prompt"] == "a photo of mira woman"
    assert wizard.steps_for(15, 1) == 1500 and wizard.steps_for(3, 1) == 800 and wizard.steps_for(40, 2) == 1500


@pytest.mark.slow
def test_whole_run_on_tiny(ws, tmp_path):
    photos = make_photos(tmp_path / "p", 6)
    qc = QuickConfig(photos=[tmp_path / "p"], name="mira", class_word="woman", regularization=True, reg_count=2,
                     **FAST)
    p = plan(qc, ws)
    job = run_foreground(p.run_name, "quick", quick_work(p, ws))
    snap = job.log.snapshot()
    assert isinstance(snap["end"], Finished) and not snap["end"].stopped, snap["end"]
    events = job.log.events()
    states = {r["id"]: r["state"] for r in wizard.stage_states(events, snap["end"])}
    assert set(states.values()) == {"done"}, states
    # Stages ran in order, each started before the next.
    order = [e.stage.split(".")[1] for e in events if isinstance(e, Status) and e.stage.startswith("quick.")
             and e.stage.count(".") == 1 and e.stage.split(".")[1] in states]
    assert order == [sid for sid, _ in wizard.STAGES]
    # The dataset: kohya layout, cropped to 64 px, captions start with trigger + class, class images in reg/.
    imgs = sorted((p.dataset / "img" / "1_mira woman").glob("*.png"))
    assert len(imgs) == len(photos) and all(Image.open(i).size == (64, 64) for i in imgs)
    assert all(i.with_suffix(".txt").read_text().startswith("mira woman") for i in imgs)
    assert len(list((p.dataset / "reg" / "1_woman").glob("*.png"))) == 2
    # Training: Step events, the LoRA published in models/lora, the grid made through the Playground.
    assert [s[0] for s in snap["steps"]] == [1, 2, 3]
    lora = ws.models("lora") / f"{p.run_name}.safetensors"
    assert lora.is_file()
    grid = [e for e in snap["saved"] if e.kind == "grid"]
    assert grid and Image.open(grid[0].path).size[0] >= 4 * 64
    assert any(isinstance(e, Preview) and "final grid" in e.captions for e in events)
    summary = json.loads((p.run_dir / "quick.json").read_text())
    assert summary["lora"] == f"models/lora/{p.run_name}.safetensors" and "<lora:" in summary["prompt"]
    assert job.result == summary

    # One generation with the LoRA in the Playground succeeds, and the LoRA changes the picture.
    import numpy as np

    from sdstudio.playground.recipe import LoraItem, Recipe
    from sdstudio.playground.session import Playground

    pg = Playground(resolve=ws.resolve, lora_dir=ws.models("lora"), device="cpu")
    r = Recipe(base_model="tiny", prompt="a photo of mira woman", steps=2, width=64, height=64)
    plain = np.asarray(pg.run(r)[0], dtype=float)
    tuned = np.asarray(pg.run(r.replace(lora=[LoraItem(path=summary["lora"], weight=1.0)]))[0], dtype=float)
    assert np.abs(plain - tuned).max() > 0

    # Train again with more steps: resumes from the checkpoint at step 3 and continues to 5.
    job2 = run_foreground(p.run_name, "quick", wizard.more_steps_work(ws, p.run_name, 2, grid_steps=1, device="cpu"))
    end2 = job2.log.snapshot()["end"]
    assert isinstance(end2, Finished) and not end2.stopped, end2
    assert [s[0] for s in job2.log.snapshot()["steps"]] == [4, 5]
    assert any(isinstance(e, Status) and "resumed from step 3" in e.message for e in job2.log.events())
    assert json.loads((p.run_dir / "quick.json").read_text())["steps"] == 5
    # The first final LoRA was kept under its step's number, in the run and in models/lora, not overwritten.
    assert (p.run_dir / f"{p.run_name}-000003.safetensors").is_file()
    assert (ws.models("lora") / f"{p.run_name}-000003.safetensors").is_file()
    with pytest.raises(UserError, match="not a finished Quick run"):
        wizard.check_more_steps(ws, "nothing-here", 10)

    # No file that we wrote holds the workspace's absolute path: not the LoRA's metadata (run card, base model),
    # not the grid's or a generation's PNG text, not the run's config.toml, quick.json or the dataset's records.
    from sdstudio.playground.session import generation_work

    run_foreground("g", "generate", generation_work(
        pg, r.replace(lora=[LoraItem(path=summary["lora"], weight=0.8)], seed=-1), ws.root / "outputs"))
    assert list((ws.root / "outputs").glob("*.png"))
    root = str(ws.root).encode()
    leaks = sorted(f.relative_to(ws.root).as_posix() for f in ws.root.rglob("*")
                   if f.is_file() and root in f.read_bytes())
    assert leaks == []


def test_stop_during_training_keeps_a_checkpoint(ws, tmp_path):
    make_photos(tmp_path / "p", 5)
    p = plan(QuickConfig(photos=[tmp_path / "p"], name="mira", class_word="dog", **{**FAST, "max_steps": 400}), ws)
    from sdstudio.jobs import Job

    job = Job(name=p.run_name, kind="quick", work=quick_work(p, ws))
    job.listeners.append(lambda ev: job.stop() if isinstance(ev, Step) and ev.step == 2 else None)
    job.start().join(240)
    end = job.log.snapshot()["end"]
    assert isinstance(end, Finished) and end.stopped
    states = {r["id"]: r["state"] for r in wizard.stage_states(job.log.events(), end)}
    assert states["train"] == "stopped" and states["grid"] == "pending"
    assert list((p.run_dir / "checkpoints").glob("step-*"))


def test_cli_refuses_before_training_and_exits_2(tmp_path):
    make_photos(tmp_path / "few", 3)
    make_photos(tmp_path / "p", 6)
    home = tmp_path / "home"
    for folder, args, match in (("few", ["--name", "mira", "--class", "woman"], "Only 3 photo"),
                                ("p", ["--name", "mira", "--class", ""], "class is empty"),
                                ("p", ["--name", "mira", "--class", "woman", "--memory", "4"], "too little")):
        r = subprocess.run([sys.executable, "-m", "sdstudio", "--home", str(home), "quick", str(tmp_path / folder), *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().startswith("error: ") and match in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not list((home / "runs").glob("*"))


@pytest.mark.slow
def test_sdxl_base_picks_the_sdxl_ladder_and_runs_from_photos_to_a_grid(ws, tmp_path):
    """An SDXL base switches the wizard to the SDXL presets (1024 px, their memory advice); on tiny-sdxl the whole
    run goes from photos to a LoRA in models/lora and a grid, as `sdstudio quick photos/ --base tiny-sdxl` does."""
    make_photos(tmp_path / "p", 5)
    assert wizard.pick_preset(12, xl=True) == "character-lora-sdxl-12gb"
    real = plan(QuickConfig(photos=[tmp_path / "p"], name="mira", class_word="woman", memory_gb=24,
                            **{**FAST, "base_model": "tiny-sdxl", "resolution": 0}), ws)
    assert real.preset == "character-lora-sdxl-24gb" and real.values["resolution"] == 1024
    qc = QuickConfig(photos=[tmp_path / "p"], name="mira", class_word="woman", memory_gb=24,
                     **{**FAST, "base_model": "tiny-sdxl", "max_steps": 2})
    p = plan(qc, ws)
    job = run_foreground(p.run_name, "quick", quick_work(p, ws))
    snap = job.log.snapshot()
    assert isinstance(snap["end"], Finished) and not snap["end"].stopped, snap["end"]
    from sdstudio.formats.safe_io import read_safetensors_metadata

    loras = list((ws.root / "models" / "lora").glob("*.safetensors"))
    assert loras and read_safetensors_metadata(loras[0])["ss_base_model_version"] == "sdxl_base_v1-0"
    summary = json.loads((p.run_dir / "quick.json").read_text())
    assert any(Path(ws.root / g).is_file() or Path(g).is_file() for g in [summary.get("grid", "")] if g), summary
