"""The five holes issue #11 found, each reproduced as it was reported. Every test here failed on main before its
fix (checked by running this file against main's code) and passes after it.

1. path traversal through names (the run name first, then every other name or path a user or recipe gives);
2. NaN and infinity in float settings, recipe fields, grid axes and CLI options;
3. the app dying on a busy machine (Gradio's one 3-second start-up probe);
4. temporary folders that kills leave in a run, never cleared;
5. A1111 `.pt` embeddings refused unless the user opts in, where ComfyUI loads them safely by default.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sdstudio.errors import UserError
from train_helpers import fast_sets, make_images, make_kohya_dataset

ROOT = Path(__file__).resolve().parents[2]


def _cli(args, tmp_path, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", SDSTUDIO_HOME=str(tmp_path / "ws"))
    return subprocess.run([sys.executable, "-m", "sdstudio", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _cli_here(args, tmp_path, capsys, monkeypatch):
    """`sdstudio ARGS` through the console script's own main(), in this process: the same code as _cli without
    paying Python's start-up for each call. Returns (exit code, stderr) like a finished process."""
    import types

    from sdstudio.cli import main

    monkeypatch.setenv("SDSTUDIO_HOME", str(tmp_path / "ws"))
    monkeypatch.setenv("SDSTUDIO_QUIET", "1")  # main() sets it: restored after the test
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    return types.SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)


def _one_line_error(r) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")} if folder.exists() else set()


# -- 1. path traversal ----------------------------------------------------------------------------------------

def test_cli_run_name_cannot_write_outside_the_workspace(tmp_path, capsys, monkeypatch):
    """As reported: output_name=../../../outside/ESCAPED exited 0 and wrote ESCAPED.safetensors outside."""
    ds = make_kohya_dataset(tmp_path / "ds", n=2)
    r = _cli_here(["train", "character-lora-sd15", "--set", "base_model=tiny", "--set", f"dataset={ds}",
              "--set", "output_name=../../../outside/ESCAPED", "--set", "max_steps=1", "--set", "resolution=64",
              "--set", "sample_steps=1", "--set", "save_every=0", "--set", "device=cpu"], tmp_path, capsys, monkeypatch)
    assert not list(tmp_path.rglob("ESCAPED*")), "a file was written through the run name"
    _one_line_error(r)
    assert "output_name" in r.stderr and "path separator" in r.stderr


@pytest.mark.parametrize("name", ["../x", "a/b", "..\\..\\x", ".hidden", "a\x00b", "tab\there", "/etc/passwd"])
def test_output_name_is_a_name_never_a_path(name):
    from sdstudio.train.config import load_config

    with pytest.raises(UserError, match="output_name"):
        load_config(None, extra={"output_name": name})


def test_train_tab_run_name_cannot_escape(tmp_path, workspace):
    """The Train tab's "Run name" feeds the same setting: with --auth on 0.0.0.0 a logged-in user could write
    anywhere the process can."""
    from sdstudio.ui.context import AppContext
    from sdstudio.ui.train_tab import start_run

    make_kohya_dataset(workspace.root / "datasets" / "ds", n=2)
    ctx = AppContext(workspace)
    values = {"method": "lora", "base_model": "tiny", "dataset": "datasets/ds", "output_name": "../../../pwned",
              "resolution": 64, "max_steps": 1, "sample_steps": 1, "device": "cpu"}
    try:
        with pytest.raises(UserError, match="output_name"):
            job = start_run(ctx, values, None)
            job.join(600)  # (on main it ran; let it finish before the assertions below)
    finally:
        for job in ctx.jobs.running():
            job.stop()
            job.join(60)
    assert not list(tmp_path.rglob("pwned*"))


def test_train_tab_class_folder_must_be_in_the_workspace(tmp_path, workspace):
    from sdstudio.ui.context import AppContext
    from sdstudio.ui.train_tab import start_run

    make_kohya_dataset(workspace.root / "datasets" / "ds", n=2)
    outside = make_images(tmp_path / "outside-class", 2, captions=False)
    ctx = AppContext(workspace)
    values = {"method": "lora", "base_model": "tiny", "dataset": "datasets/ds", "output_name": "run",
              "prior_preservation": True, "class_data": str(outside), "resolution": 64, "max_steps": 1,
              "sample_steps": 1, "device": "cpu"}
    try:
        with pytest.raises(UserError, match="outside the workspace"):
            start_run(ctx, values, None)
    finally:
        for job in ctx.jobs.running():
            job.stop()
            job.join(120)


@pytest.mark.parametrize("word", ["../../../../escaped", "dog/../../x", "a\\b"])
def test_class_word_cannot_make_a_folder_elsewhere(tmp_path, word):
    """The class word names `reg/1_<class>/` (Dataset tab and `sdstudio regularize`)."""
    from sdstudio.data.regularization import reg_dir

    with pytest.raises(UserError, match="slash"):
        reg_dir(tmp_path / "ds", word)


def test_fusion_panel_reads_no_base_model_outside_the_workspace(tmp_path, workspace):
    from sdstudio.formats.safe_io import save_safetensors
    from sdstudio.ui import fusion_panel
    from sdstudio.ui.context import AppContext

    import torch

    for name, tokens in (("ann", ("<a1>", "<a2>")), ("bob", ("<b1>", "<b2>"))):
        save_safetensors({f"new_concept_embedding.{t}": torch.zeros(2, 32) for t in tokens},
                         workspace.models("edlora") / f"{name}.safetensors")
    outside = tmp_path / "outside-model"
    outside.mkdir()
    ctx = AppContext(workspace)
    files = ["models/edlora/ann.safetensors", "models/edlora/bob.safetensors"]
    try:
        with pytest.raises(UserError, match="outside the workspace"):
            fusion_panel.start_fuse(ctx, str(outside), files, "duo", 1, 1)
    finally:
        for job in ctx.jobs.running():
            job.stop()
            job.join(120)


def test_more_steps_run_name_is_a_name(tmp_path, workspace):
    """`sdstudio quick --more-steps N --run NAME`: the run is looked up by name inside runs/, never by path."""
    from sdstudio.train.config import TrainConfig
    from sdstudio.wizard import check_more_steps

    fake = tmp_path / "elsewhere"
    (fake / "checkpoints" / "step-1").mkdir(parents=True)
    (fake / "checkpoints" / "step-1" / "state.json").write_text('{"step": 1}')
    (fake / "quick.json").write_text(json.dumps({"trigger": "x", "class": "person"}))
    (fake / "config.toml").write_text(TrainConfig(output_dir=str(fake)).to_toml())
    rel = os.path.relpath(fake, workspace.root / "runs")
    with pytest.raises(UserError, match="path separator|outside the workspace"):
        check_more_steps(workspace, rel, 10)


def test_a_workspace_is_never_the_home_folder_or_above(tmp_path, monkeypatch):
    """The app serves and reads what is inside its workspace: `--home ~` (or `/`) would expose everything."""
    from sdstudio.workspace import Workspace

    home = tmp_path / "home" / "me"
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    for root in (home, home.parent):
        with pytest.raises(UserError, match="cannot be the workspace"):
            Workspace.open(root)
        assert not (root / "datasets").exists()  # refused before anything was created
    assert Workspace.open(home / "sdstudio").root == (home / "sdstudio").resolve()


# -- 2. non-finite numbers ------------------------------------------------------------------------------------

def test_cli_nan_learning_rate_is_one_line_exit_2(tmp_path):
    """As reported: learning_rate=nan ended with "error: ValueError: Invalid learning rate: nan" and exit 1."""
    ds = make_kohya_dataset(tmp_path / "ds", n=2)
    r = _cli(["train", "character-lora-sd15", *sum((["--set", s] for s in fast_sets(
        ds, tmp_path / "run", learning_rate="nan", max_steps=1)), [])], tmp_path)
    _one_line_error(r)
    assert "learning_rate = nan is not a finite number" in r.stderr
    assert not (tmp_path / "run" / "log.jsonl").exists()


def _float_fields():
    """(table, key) of every float setting of every config dataclass built through fields.build_dataclass."""
    from sdstudio.fields import user_fields
    from sdstudio.methods.registry import all_methods
    from sdstudio.train.config import TrainConfig

    out = [("", f.name) for f in user_fields(TrainConfig) if _is_float(TrainConfig, f)]
    for name, cls in sorted(all_methods().items()):
        out += [(name, f.name) for f in user_fields(cls.Config) if _is_float(cls.Config, f)]
    return out


def _is_float(cls, f) -> bool:
    import typing

    t = typing.get_type_hints(cls).get(f.name)
    return t is float or (typing.get_origin(t) is not None and float in typing.get_args(t))


def test_every_float_setting_refuses_nan_and_infinity():
    """`ema_decay=nan` trained and wrote a LoRA: NaN passes every min/max bound. Every float setting, each
    method's included, from TOML/--set text and from typed values (the UI form) alike."""
    from sdstudio.train.config import load_config

    fields = _float_fields()
    assert len(fields) >= 15 and ("", "ema_decay") in fields and ("", "learning_rate") in fields
    for table, key in fields:
        for bad in ("nan", "inf", "-inf", float("nan"), float("inf")):
            method = table or "lora"
            extra = {"method": method, table: {key: bad}} if table else {key: bad}
            with pytest.raises(UserError, match="not a finite number"):
                load_config(None, extra=extra)


def test_fuse_config_refuses_nan():
    from sdstudio.fields import build_dataclass
    from sdstudio.methods.fusion import FuseConcept

    with pytest.raises(UserError, match="not a finite number"):
        build_dataclass(FuseConcept, {"path": "a.safetensors", "unet_weight": float("nan")})


def _recipe_float_cases():
    """(TOML text, what it breaks) for every float field of a recipe and of each item table."""
    base = 'prompt = "x"\n'
    cases = [(base + f"{k} = {v}\n", k) for k in ("cfg", "strength") for v in ("nan", "inf", "-inf")]
    items = {
        "lora": ('path = "a.safetensors"', ("weight", "text_encoder_weight", "start", "end")),
        "controlnet": ('path = "cn"', ("weight", "start", "end")),
        "t2i_adapter": ('path = "ad"', ("weight", "start", "end")),
        "region": ('prompt = "r"', ("t2i_weight",)),
    }
    for table, (first, keys) in items.items():
        for k in keys:
            cases.append((f"{base}[[{table}]]\n{first}\n{k} = nan\n", f"{table}.{k}"))
    cases.append((base + '[[lora]]\npath = "a.safetensors"\nblocks = [1.0, nan]\n', "lora.blocks"))
    cases.append((base + '[[region]]\nprompt = "r"\nbox = [0.0, 0.0, inf, 1.0]\n', "region.box"))
    return cases


@pytest.mark.parametrize("text,what", _recipe_float_cases(), ids=[w for _t, w in _recipe_float_cases()])
def test_every_recipe_float_refuses_nan(text, what):
    from sdstudio.playground.recipe import Recipe

    with pytest.raises(UserError):
        Recipe.from_toml(text)


def test_slider_values_reach_the_recipe_checked():
    """The Playground builds its Recipe from slider values without TOML: validate() sweeps every float."""
    from sdstudio.playground.recipe import Recipe, RegionItem

    for bad in (Recipe(cfg=float("nan")), Recipe(strength=float("inf")),
                Recipe(region=[RegionItem(prompt="r", t2i_weight=float("nan"))])):
        with pytest.raises(UserError, match="not a finite number"):
            bad.validate()


@pytest.mark.parametrize("axis", ["cfg=5,nan", "lora_weight[0]=0,inf", "cfg=-inf"])
def test_grid_axis_refuses_nan(axis):
    from sdstudio.playground.grid import parse_axis

    with pytest.raises(UserError, match="finite"):
        parse_axis(axis)


def test_cli_float_options_refuse_nan(tmp_path, capsys, monkeypatch):
    src = make_images(tmp_path / "photos", 2, captions=False)
    r = _cli_here(["prepare", str(src), "--out", str(tmp_path / "ds"), "--size", "64", "--trigger", "sks",
                   "--general-threshold", "nan"], tmp_path, capsys, monkeypatch)
    assert r.returncode == 2 and "not a finite number" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "ds").exists()


# -- 3. a busy machine ----------------------------------------------------------------------------------------

SLOW_START = r"""
import runpy, sys, time
import gradio.routes as routes

# A busy machine, made repeatable: the server's first answer takes 4 s (the whole server stalls, as it does when
# the CPU is taken), longer than the single 3-second probe Gradio makes before deciding localhost is unreachable.
original, stalled = routes.App.__call__, []

async def busy(self, scope, receive, send):
    if scope["type"] == "http" and not stalled:
        stalled.append(scope["path"])
        time.sleep(4.0)
    return await original(self, scope, receive, send)

routes.App.__call__ = busy
sys.argv = sys.argv[1:]  # python -c CODE app.py --port ...: app.py sees its own arguments
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_app_starts_when_the_first_answer_is_slow(tmp_path):
    from conftest import AppServer, _free_port

    class SlowApp(AppServer):
        def __init__(self, home):
            self.home, self.port = home, _free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.log = home.parent / "slow-app.log"
            env = dict(os.environ, PYTHONUNBUFFERED="1", SDSTUDIO_HOME=str(home))
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SLOW_START, str(ROOT / "app.py"), "--port", str(self.port), "--home",
                 str(home), "--no-browser"], stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env,
                cwd=str(ROOT))
            self._wait(180)

    app = SlowApp(tmp_path / "ws")
    try:
        assert app.proc.poll() is None, app.log.read_text()
        assert "shareable link" not in app.log.read_text()
    finally:
        app.stop()


# -- 4. leftovers of killed saves -----------------------------------------------------------------------------

def _plant_leftovers(run: Path) -> list[Path]:
    """What kill -9 leaves, named exactly as the atomic writers name their temporaries."""
    ck = run / "checkpoints"
    half = Path(tempfile.mkdtemp(prefix=".step-5.", suffix=".tmp", dir=ck))
    (half / "trainable.safetensors").write_bytes(b"\0" * 1000)
    swapped = ck / ".step-2.old-12345"
    swapped.mkdir()
    (swapped / "state.json").write_text("{}")
    fd, lora_tmp = tempfile.mkstemp(prefix=".character-lora.safetensors.", suffix=".tmp", dir=run)
    os.close(fd)
    fd, log_tmp = tempfile.mkstemp(prefix=".log.jsonl.", suffix=".tmp", dir=run)
    os.close(fd)
    return [half, swapped, Path(lora_tmp), Path(log_tmp)]


def test_resume_and_finish_clear_the_runs_leftovers(tmp_path):
    from sdstudio.train.config import load_config
    from sdstudio.train.loop import train

    ds = make_kohya_dataset(tmp_path / "ds", n=2)
    run = tmp_path / "run"
    cfg = load_config("character-lora-sd15", fast_sets(ds, run, max_steps=2, save_every=1))
    train(cfg, lambda e: None)
    mine = [run / "notes.tmp", run / ".my-settings", run / "checkpoints" / "keep.txt"]  # not ours: kept
    for p in mine:
        p.write_text("mine")

    planted = _plant_leftovers(run)
    cfg = load_config("character-lora-sd15", fast_sets(ds, run, max_steps=3, save_every=1))
    seen_at_start = []
    train(cfg, lambda e: seen_at_start.append([p.exists() for p in planted]) if not seen_at_start else None,
          resume=True)
    assert not any(p.exists() for p in planted), "a resume kept the leftovers of earlier kills"
    assert all(p.read_text() == "mine" for p in mine)

    planted = _plant_leftovers(run)  # left while the run was finishing
    cfg = load_config("character-lora-sd15", fast_sets(ds, run, max_steps=3, save_every=1))
    train(cfg, lambda e: None, resume=True)  # already at max_steps: it only finishes
    assert not any(p.exists() for p in planted), "a finished run kept the leftovers"
    assert all(p.read_text() == "mine" for p in mine)


# -- 5. .pt embeddings ----------------------------------------------------------------------------------------

class _Payload:
    """A pickle that runs a shell command when loaded: the reason pickles are dangerous."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pt(path: Path, payload: dict) -> Path:
    import torch

    torch.save(payload, path)
    return path


def test_a1111_pt_embedding_loads_by_default_and_a_payload_never_runs(tmp_path):
    import torch

    from sdstudio.formats.embeddings import load_embedding

    vec = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    a1111 = _pt(tmp_path / "style.pt", {"string_to_token": {"*": 265}, "string_to_param": {"*": vec},
                                       "name": "style", "step": 10, "sd_checkpoint": None})
    e = load_embedding(a1111)  # no opt-in, as ComfyUI does
    torch.testing.assert_close(e.vectors[0], vec)
    assert e.token == "<style>"
    legacy = _pt(tmp_path / "legacy.pt", {"string_to_token": {"*": torch.tensor(265)}, "string_to_param":
                                          torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})})
    torch.testing.assert_close(load_embedding(legacy).vectors[0], vec)  # the original textual-inversion layout

    marker = tmp_path / "PAYLOAD-RAN"
    evil = _pt(tmp_path / "evil.pt", {"string_to_param": {"*": vec}, "x": _Payload(marker)})
    for opt_in in (False, True):
        with pytest.raises(UserError, match="posix.system|system"):
            load_embedding(evil, allow_pickle=opt_in)
    assert not marker.exists(), "the pickle's payload ran"


def test_pt_embedding_in_the_playground_and_generate_without_opt_in(tmp_path, capsys, monkeypatch):
    """The Playground (which never opts in) uses an A1111 .pt embedding; `sdstudio generate` too."""
    import numpy as np
    import torch

    from sdstudio.playground.recipe import EmbeddingItem, Recipe
    from sdstudio.playground.session import Playground

    torch.set_num_threads(1)
    vec = torch.randn(2, 32, generator=torch.Generator().manual_seed(4)) * 5
    pt = _pt(tmp_path / "mystyle.pt", {"string_to_token": {"*": 265}, "string_to_param": {"*": vec},
                                       "name": "mystyle", "step": 100})
    recipe = Recipe(prompt="a photo in <mystyle> style", steps=2, width=64, height=64, sampler="euler", seed=3,
                    embedding=[EmbeddingItem(str(pt), "<mystyle>")])
    session = Playground(device="cpu")
    with_emb = np.asarray(session.run(recipe)[0])
    without = np.asarray(session.run(recipe.replace(embedding=[]))[0])
    assert not np.array_equal(with_emb, without)

    marker = tmp_path / "PAYLOAD-RAN"
    evil = _pt(tmp_path / "evil.pt", {"string_to_param": {"*": vec}, "x": _Payload(marker)})
    (tmp_path / "r.toml").write_text(recipe.replace(embedding=[EmbeddingItem(str(evil), "<e>")]).to_toml())
    r = _cli_here(["generate", str(tmp_path / "r.toml"), "--out", str(tmp_path / "out"), "--allow-pickle",
                   "--device", "cpu"], tmp_path, capsys, monkeypatch)
    _one_line_error(r)
    assert not marker.exists() and not _files_under(tmp_path / "out")


def test_dataclass_helpers_are_used():  # keep _is_float honest: a float | None field counts as a float
    @dataclasses.dataclass
    class C:
        a: float = 1.0
        b: "float | None" = None
        c: int = 1

    assert [f.name for f in dataclasses.fields(C) if _is_float(C, f)] == ["a", "b"]
