"""The one rule for model references and user paths (models/refs.py), in every command: no network, no model
loads (the hub itself is in test_models_hub.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdstudio.errors import UserError
from sdstudio.models.refs import ALIASES, HubId, Places, parse_hub_id

ROOT = Path(__file__).resolve().parent.parent


def test_no_file_names_the_deleted_runway_repo_but_the_alias():
    """Runway deleted runwayml/stable-diffusion-v1-5 in 2024: only the alias table (and this test) may name it."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    named = sorted(f for f in files if (ROOT / f).is_file() and not f.endswith(".png")
                   and "runwayml/" in (ROOT / f).read_text(encoding="utf-8", errors="ignore"))
    assert named == ["sdstudio/models/refs.py", "tests/test_models_refs.py"]
    assert ALIASES["runwayml/stable-diffusion-v1-5"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    # GLIGEN trains on a gated GLIGEN checkpoint, not on plain SD 1.5.
    presets = [p.read_text() for p in (ROOT / "presets").glob("*sd15*.toml") if not p.name.startswith("gligen")]
    assert presets and all('base_model = "stable-diffusion-v1-5/stable-diffusion-v1-5"' in t for t in presets)


def test_hub_ids_revisions_and_the_alias(tmp_path):
    assert parse_hub_id("org/name") == HubId("org/name")
    assert parse_hub_id("org/name@v1.0") == HubId("org/name", "v1.0")
    assert parse_hub_id("org/name@main") == HubId("org/name")  # main is what no revision means
    assert str(parse_hub_id("org/name@refs/pr/3")) == "org/name@refs/pr/3"
    assert parse_hub_id("org/name@refs/pr/3").folder_name == "org--name@refs--pr--3"
    for not_an_id in ("tiny", "a/b/c", "/abs/path", "./rel/x", "org/", "org/x.safetensors", "org/../x", "o rg/x"):
        assert parse_hub_id(not_an_id) is None, not_an_id
    ref = Places(tmp_path).model("runwayml/stable-diffusion-v1-5")
    assert ref.kind == "hub" and ref.ref == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert "no longer exists" in ref.note and "stable-diffusion-v1-5/stable-diffusion-v1-5" in ref.note


def test_model_reference_order(tmp_path, tiny_dir, monkeypatch):
    """tiny; an existing path (workspace, then the current folder); a model by name; a hub id."""
    import shutil

    ws, cwd = tmp_path / "ws", tmp_path / "cwd"
    (ws / "models" / "checkpoints").mkdir(parents=True)
    cwd.mkdir()
    shutil.copytree(tiny_dir, ws / "models" / "checkpoints" / "mine")
    (ws / "models" / "checkpoints" / "single.safetensors").write_bytes(b"x")
    shutil.copytree(tiny_dir, ws / "models" / "checkpoints" / "org--dl")  # a downloaded hub model
    shutil.copytree(tiny_dir, cwd / "here")
    places = Places(ws, cwd)
    assert places.model("tiny").ref == "tiny"
    assert places.model("models/checkpoints/mine").path == (ws / "models/checkpoints/mine").resolve()
    assert places.model("here").path == (cwd / "here").resolve()  # not in the workspace: the current folder
    (ws / "here").mkdir()  # now the workspace has one too: it wins
    assert places.model("here").path == (ws / "here").resolve()
    assert places.model("mine").path == (ws / "models/checkpoints/mine").resolve()  # by name
    assert places.model("single").path.name == "single.safetensors"  # by name, without its extension
    assert places.model("org/dl").path.name == "org--dl"  # a hub id already downloaded: no network
    assert places.model("org/other").kind == "hub"
    with pytest.raises(UserError) as e:
        places.model("nothing-here")
    msg = str(e.value)
    assert "\n" not in msg and "tried" in msg and str(ws / "nothing-here") in msg and str(cwd / "nothing-here") in msg
    assert "models/checkpoints" in msg and "hub id" in msg


def test_user_paths_workspace_then_cwd_and_the_app_confined(tmp_path):
    ws, cwd, other = tmp_path / "ws", tmp_path / "cwd", tmp_path / "other"
    for d in (ws / "datasets" / "d", cwd / "datasets" / "e", other):
        d.mkdir(parents=True)
    cli = Places(ws, cwd)
    assert cli.path("datasets/d") == (ws / "datasets/d").resolve()
    assert cli.path("datasets/e") == (cwd / "datasets/e").resolve()
    assert cli.path(str(other)) == other.resolve()  # the CLI may read anywhere
    assert cli.output("out/new") == (ws / "out/new").resolve()  # a new output goes into the workspace
    with pytest.raises(UserError, match="does not exist.*looked for"):
        cli.path("datasets/zzz", what="dataset folder")
    app = Places(ws, None, confine=True, read_only=(other.resolve(),))
    assert app.path("datasets/d") == (ws / "datasets/d").resolve()
    assert app.path(str(other)) == other.resolve()  # a --models-from folder: readable
    with pytest.raises(UserError, match="outside the workspace"):
        app.output(str(other / "x"))  # ...never writable
    with pytest.raises(UserError, match="outside the workspace"):
        app.path("../cwd/datasets/e")
    with pytest.raises(UserError, match="outside the workspace"):
        Places(ws, None, confine=True).path(str(other))


def test_help_states_both_rules():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "sdstudio", "--help"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "model references" in text and "relative to the workspace, then to the current folder" in text
    assert "org/name[@revision]" in text and "by name" in text
    assert "paths (datasets, recipes, outputs" in text and "--models-from" in text
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "relative to the workspace first, then to the current folder" in readme
    assert "org/name[@revision]" in readme and "--models-from" in readme


def test_train_cli_finds_a_workspace_dataset_and_names_what_it_tried(tmp_path):
    """`sdstudio --home WS train PRESET --set dataset=datasets/d` reads WS/datasets/d, from any folder; a base
    that matches nothing is one line naming what was tried, before any model loads."""
    from train_helpers import make_kohya_dataset

    ws = tmp_path / "ws"
    make_kohya_dataset(ws / "datasets" / "d", n=1, repeats=1)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    base = [sys.executable, "-m", "sdstudio", "--home", str(ws), "train", "character-lora-sd15", "--set",
            "dataset=datasets/d", "--set", "output_name=r"]
    r = subprocess.run(base + ["--set", "base_model=tiny", "--print-config"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f'dataset = "{(ws / "datasets" / "d").resolve()}"' in r.stdout
    r = subprocess.run(base + ["--set", "base_model=no-such-model"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "tried" in r.stderr and str(ws / "no-such-model") in r.stderr and str(tmp_path / "no-such-model") in r.stderr
