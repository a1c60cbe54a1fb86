"""A1111/kohya habits on disk: numbered saves every N steps (name-000002.safetensors), a final file never
overwritten without keeping the previous one (in the run and in models/), checkpoint pruning that keeps the
checkpoint a published file came from, and the run's status.json (finished, failed with why)."""
from __future__ import annotations

import pytest

from sdstudio.errors import UserError
from sdstudio.formats.safe_io import read_safetensors_metadata
from sdstudio.publish import publish
from sdstudio.train.config import load_config
from sdstudio.train.loop import train
from sdstudio.train.status import read_status
from sdstudio.workspace import Workspace
from train_helpers import fast_sets, make_kohya_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _steps(path) -> int:
    return int(read_safetensors_metadata(path)["ss_steps"])


def test_numbered_saves_keep_previous_final_and_prune_around_the_published_step(tmp_path, tiny_dir):
    ws = Workspace.open(tmp_path / "ws")
    ds = make_kohya_dataset(ws.root / "datasets" / "d", n=2)
    run = ws.root / "runs" / "mira"
    sets = fast_sets(ds, run, output_name="mira", max_steps=4, save_every=2, keep_checkpoints=1)
    out = train(load_config(None, sets), lambda e: None, publish=lambda paths: publish(ws, paths))

    # 1. Numbered saves at the periodic checkpoints (not at the end: that is the final file), with their step.
    assert [p.name for p in out] == ["mira.safetensors"]
    assert sorted(p.name for p in run.glob("*.safetensors")) == ["mira-000002.safetensors", "mira.safetensors"]
    assert _steps(run / "mira-000002.safetensors") == 2 and _steps(run / "mira.safetensors") == 4
    assert read_status(run)["state"] == "finished" and read_status(run)["step"] == 4
    published = ws.models("lora") / "mira.safetensors"
    assert _steps(published) == 4

    # 2. Train again (resume to 6 steps, keep 1 checkpoint): the old finals stay as mira-000004, in the run and in
    #    models/lora; the new final is step 6.
    old_bytes = published.read_bytes()
    sets6 = fast_sets(ds, run, output_name="mira", max_steps=6, save_every=2, keep_checkpoints=1)
    train(load_config(None, sets6), lambda e: None, resume=True, publish=lambda paths: publish(ws, paths))
    assert _steps(run / "mira.safetensors") == 6 and _steps(run / "mira-000004.safetensors") == 4
    assert (ws.models("lora") / "mira-000004.safetensors").read_bytes() == old_bytes
    assert _steps(ws.models("lora") / "mira.safetensors") == 6

    # 3. Pruning kept only the last checkpoint, plus step 4, whose artefacts were published (and step 6's).
    assert sorted(int(d.name.split("-")[1]) for d in (run / "checkpoints").iterdir()) == [4, 6]


def test_a_failed_run_says_why_in_its_status(tmp_path, tiny_dir):
    ws = Workspace.open(tmp_path / "ws")
    ds = make_kohya_dataset(ws.root / "datasets" / "d", n=2)
    run = ws.root / "runs" / "bad"
    cfg = load_config(None, fast_sets(ds, run, output_name="bad", optimizer="adamw8bit"))
    before = ws.change_token()
    with pytest.raises(UserError, match="adamw8bit"):
        train(cfg, lambda e: None)
    st = read_status(run)
    assert st["state"] == "failed" and "adamw8bit needs a CUDA GPU" in st["reason"] and st["step"] == 0
    assert ws.change_token() != before  # the runs tables redraw

    from sdstudio.library import scan_runs

    [entry] = scan_runs(ws)
    assert (entry.state, entry.steps, entry.total) == ("failed", 0, 4) and "CUDA" in entry.reason


def test_a_run_whose_process_died_reads_as_stopped(tmp_path):
    import json

    run = tmp_path / "runs" / "gone"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "running", "total": 10, "pid": 2**22 + 12345,
                                                 "host": __import__("socket").gethostname()}))
    st = read_status(run)
    assert st["state"] == "stopped" and "Resume" in st["reason"]
