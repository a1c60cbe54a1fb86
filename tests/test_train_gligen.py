"""GLIGEN grounding training on the tiny model: boxes cut with their images, exact resume, only the gated layers
change (every other UNet, text-encoder and VAE tensor stays bit-identical), new layers start exactly at the base,
the saved module file is published into models/gligen/ and steers the Playground on a plain base, and bad input is
refused in one sentence before any model loads.

(The contract test, tests/test_train_contract.py, runs gligen through the registry as well.)"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sdstudio.errors import UserError
from sdstudio.events import Preview
from sdstudio.jobs import Commands
from sdstudio.train.config import load_config
from sdstudio.train.loop import preflight, train
from train_helpers import fast_sets, make_kohya_dataset, train_until_stopped

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def gligen_base(tmp_path_factory, tiny_dir) -> Path:
    """The tiny GLIGEN model (gated diffusers folder, with its module file gligen.safetensors)."""
    from sdstudio.cli import main

    d = tmp_path_factory.mktemp("gligen-base")
    assert main(["tiny-model", str(d / "tg"), "--gligen"]) == 0
    return d / "tg"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gligen_base):
    """On the gated base: an unbroken 4-step run, and the same run stopped at step 2 and resumed, its module
    published into a workspace as the Train tab and the CLI do."""
    from sdstudio.publish import publish
    from sdstudio.workspace import Workspace

    root = tmp_path_factory.mktemp("gligen-runs")
    ds = make_kohya_dataset(root / "ds", n=3, with_boxes=True)
    ws = Workspace.open(root / "ws")
    # Every source of randomness the method adds: box dropout (from the batch generator), caption dropout, flips.
    opts = dict(method="gligen", base_model=str(gligen_base), max_steps=4, learning_rate=1e-3, lr_scheduler="cosine",
                warmup_steps=1, batch_size=2, flip="true", cache_latents="off", **{"gligen.box_dropout": 0.5})
    train(load_config(None, fast_sets(ds, root / "a", **opts)), lambda e: None)
    cfg = load_config(None, fast_sets(ds, root / "b", **opts))
    events: list = []
    train_until_stopped(cfg, 2, events.append)
    outputs = train(cfg, events.append, resume=True, publish=lambda paths: publish(ws, paths))
    return dict(a=root / "a", b=root / "b", ws=ws, ds=ds, outputs=outputs, events=events)


def test_stop_and_resume_repeats_the_unbroken_run(runs):
    a, b = _log(runs["a"]), _log(runs["b"])
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # exact: same boxes, dropped boxes, noise, weights
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert any(isinstance(e, Preview) for e in runs["events"])


def test_boxes_are_cut_with_their_image(tmp_path):
    """A wide image centre-cropped to a square: boxes move with the crop and the flip; a box the crop cuts away
    keeps its slot with mask 0, as padding has."""
    from PIL import Image

    from sdstudio.data.dataset import TrainDataset
    from sdstudio.data.folder import read_dataset

    folder = tmp_path / "ds" / "img" / "1_x"
    folder.mkdir(parents=True)
    Image.new("RGB", (128, 64), (90, 90, 90)).save(folder / "a.png")
    (folder / "a.txt").write_text("x")
    objs = [{"phrase": "left edge", "box": [0.0, 0.0, 0.2, 1.0]}, {"phrase": "middle", "box": [0.25, 0.5, 0.5, 1.0]}]
    (tmp_path / "ds" / "boxes.jsonl").write_text(json.dumps({"file_name": "img/1_x/a.png", "objects": objs}))
    cfg = load_config(None, fast_sets(tmp_path / "ds", tmp_path / "run", method="gligen", buckets="false"))
    data = TrainDataset(read_dataset(tmp_path / "ds"), cfg, conditioning=("boxes",))
    got = data.cond(0, "boxes")
    assert got["phrases"] == ["left edge", "middle"]
    # 128x64 -> crop x from 32 to 96: the left edge (x < 25.6) is gone; the middle box spans x 32..64 -> 0..0.5
    assert got["masks"][:3].tolist() == [0.0, 1.0, 0.0] and got["masks"].shape == (30,)
    assert torch.allclose(got["boxes"][1], torch.tensor([0.0, 0.5, 0.5, 1.0]))
    flipped = data.cond(0, "boxes", flip=True)
    assert torch.allclose(flipped["boxes"][1], torch.tensor([0.5, 0.5, 1.0, 1.0]))


def _train_own(tmp_path, base, sets=(), steps=3):
    """Train on components we hold, so their every tensor can be compared before and after."""
    from sdstudio.data.dataset import TrainDataset
    from sdstudio.data.folder import read_dataset
    from sdstudio.methods.base import RunInfo
    from sdstudio.methods.registry import get_method
    from sdstudio.models.loading import load_base
    from sdstudio.train.loop import _make_accelerator, run_loop

    ds = make_kohya_dataset(tmp_path / "ds", n=3, with_boxes=True)
    cfg = load_config(None, fast_sets(ds, tmp_path / "run", method="gligen", base_model=str(base), max_steps=steps,
                                      batch_size=2, learning_rate="1e-3", sample_prompts="[]") + list(sets))
    method = get_method("gligen")()
    data = TrainDataset(read_dataset(ds), cfg, conditioning=method.conditioning)
    acc, dtype = _make_accelerator(cfg, "cpu")
    c = load_base(str(base), device="cpu", dtype=dtype)
    method.run = RunInfo(cfg=cfg, run_dir=tmp_path / "run", layout=data.layout)
    parts = {"unet": c.unet, "te": c.text_encoder, "vae": c.vae}
    before = {f"{n}.{k}": v.clone() for n, m in parts.items() for k, v in m.state_dict().items()}
    outputs = run_loop(method, c, data, cfg, lambda e: None, Commands(), acc=acc, run_dir=tmp_path / "run")
    after = {f"{n}.{k}": v for n, m in parts.items() for k, v in m.state_dict().items()}
    return before, after, outputs


def test_training_changes_only_the_gated_parameters(tmp_path, gligen_base):
    from sdstudio.methods.gligen import gated_parameter

    before, after, outputs = _train_own(tmp_path, gligen_base)
    gated = {k for k in after if k.startswith("unet.") and gated_parameter(k[len("unet."):])}
    assert len(gated) > 100 and set(before) == set(after)  # every fuser and the position net
    changed = {k for k in after if not torch.equal(before[k], after[k].to(before[k].dtype))}
    assert changed == gated  # every gated tensor trained, every other UNet, TE and VAE tensor is bit-identical
    assert [p.suffix for p in outputs] == [".safetensors"]


def test_new_layers_start_exactly_at_the_base(tmp_path):
    """Closed gates (the paper's start): the loss with the new layers equals the plain base's, bit for bit."""
    from sdstudio.data.dataset import TrainDataset
    from sdstudio.data.folder import read_dataset
    from sdstudio.methods.base import RunInfo
    from sdstudio.methods.registry import get_method
    from sdstudio.models.loading import load_base
    from sdstudio.train.loop import _make_batch, _seed_for
    from sdstudio.train.noise import denoising_loss

    ds = make_kohya_dataset(tmp_path / "ds", n=3, with_boxes=True)
    cfg = load_config(None, fast_sets(ds, tmp_path / "run", method="gligen", batch_size=2, buckets="false",
                                      **{"gligen.new_layers": "true", "gligen.box_dropout": 0}))
    method = get_method("gligen")()
    data = TrainDataset(read_dataset(ds), cfg, conditioning=method.conditioning)
    c = load_base("tiny", device="cpu")
    method.run = RunInfo(cfg=cfg, run_dir=tmp_path / "run", layout=data.layout)
    batches = [_make_batch(c, data, cfg, g, None, None, "cpu", torch.float32, seed=_seed_for("x", g)) for g in range(2)]
    method.prepare(c, cfg)
    assert sum(p.numel() for p in c.unet.position_net.parameters()) > 0
    fusers = [m for n, m in c.unet.named_modules() if n.endswith(".fuser")]
    assert len(fusers) == 16 and all(f.alpha_attn.item() == 0 == f.alpha_dense.item() for f in fusers)
    for b in batches:  # fresh generators: the same noise as above
        b.generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        again_base = [float(denoising_loss(c, b, cfg)) for b in batches]  # the UNet without grounding inputs
    for b in batches:
        b.generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        grounded = [float(method.loss(c, b, 0)) for b in batches]
    assert any(b["masks"].any() for batch in batches for b in batch.cond["boxes"])  # boxes were there
    assert grounded == again_base  # bit for bit
    with torch.no_grad():  # and the objects do reach the new layers: opened gates change the loss
        for f in fusers:
            f.alpha_attn.fill_(1.0)
    for b in batches:
        b.generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        opened = [float(method.loss(c, b, 0)) for b in batches]
    assert all(abs(x - y) > 1e-6 for x, y in zip(opened, again_base)), (opened, again_base)


def test_published_module_loads_in_the_playground_and_steers_a_plain_base(runs, gligen_base):
    from sdstudio.formats.kinds import detect_kind
    from sdstudio.formats.safe_io import read_safetensors_metadata
    from sdstudio.library import scan_models
    from sdstudio.playground.recipe import GroundingItem, Recipe
    from sdstudio.playground.session import Playground

    ws = runs["ws"]
    published = ws.models("gligen") / "my-lora.safetensors"
    assert published.is_file() and detect_kind(published) == "gligen"
    assert ("gligen", "my-lora.safetensors") in {(m.kind, Path(m.path).name) for m in scan_models(ws)}
    meta = read_safetensors_metadata(published)
    assert meta["sdstudio.kind"] == "gligen" and meta["modelspec.architecture"] == "stable-diffusion-v1/gligen"

    pg = Playground(device="cpu")
    base = Recipe(base_model="tiny", prompt="a photo of sks person", steps=3, width=64, height=64, cfg=5.0, seed=3,
                  sampler="euler")
    grounded = base.replace(grounding=[GroundingItem("a red hat", (0.1, 0.05, 0.5, 0.4))], grounding_fraction=1.0)

    def run(recipe):
        return np.asarray(pg.run(recipe)[0]).astype(int)

    plain = run(base)
    trained = run(grounded.replace(gligen=str(published)))
    start = run(grounded.replace(gligen=str(gligen_base / "gligen.safetensors")))
    assert np.abs(trained - plain).max() > 0  # the trained module acts on the plain base
    assert np.abs(trained - start).max() > 0  # and it is the trained one, not the module training started from
    assert np.array_equal(run(base), plain)  # dropped from the recipe: the plain base again


# -- one sentence before any model loads ---------------------------------------------------------------------

def _preflight(ds, tmp_path, **sets):
    return preflight(load_config(None, fast_sets(ds, tmp_path / "run", method="gligen", **sets)))


def _boxes(ds: Path, objects: list[dict]) -> None:
    (ds / "boxes.jsonl").write_text(json.dumps({"file_name": "img/2_sks person/000.png", "objects": objects}) + "\n")


def test_bad_input_is_one_sentence_before_anything_loads(tmp_path, gligen_base):
    ds = make_kohya_dataset(tmp_path / "ds", n=2)
    new = {"gligen.new_layers": "true"}
    with pytest.raises(UserError, match=r"has no boxes\.jsonl: draw boxes in the Dataset tab"):
        _preflight(ds, tmp_path, **new)
    _boxes(ds, [{"phrase": "a hat", "box": [0.1, 0.1, 1.2, 0.5]}])
    with pytest.raises(UserError, match=r"boxes\.jsonl line 1: the box of 'a hat' .* goes outside the image"):
        _preflight(ds, tmp_path, **new)
    _boxes(ds, [{"phrase": "a hat", "box": [0.3, 0.1, 0.3, 0.5]}])
    with pytest.raises(UserError, match="has zero area"):
        _preflight(ds, tmp_path, **new)
    _boxes(ds, [{"phrase": "a " + "very " * 80 + "long hat", "box": [0.1, 0.1, 0.5, 0.5]}])
    with pytest.raises(UserError, match=r"is 83 tokens; GLIGEN reads at most 75: shorten it"):
        _preflight(ds, tmp_path, **new)
    (ds / "boxes.jsonl").write_text(json.dumps({"file_name": "img/elsewhere/000.png", "objects": [
        {"phrase": "a hat", "box": [0.1, 0.1, 0.5, 0.5]}]}) + "\n")
    with pytest.raises(UserError, match="names none of the 2 images"):
        _preflight(ds, tmp_path, **new)
    _boxes(ds, [{"phrase": "a hat", "box": [0.1, 0.1, 0.5, 0.5]}])
    with pytest.raises(UserError, match=r"The base tiny has no GLIGEN layers to train: set gligen.module"):
        _preflight(ds, tmp_path)
    with pytest.raises(UserError, match=r"The GLIGEN module .*nowhere\.safetensors does not exist"):
        _preflight(ds, tmp_path, **{"gligen.module": str(tmp_path / "nowhere.safetensors")})
    # Each way to have gated layers passes: new ones, a module file, a GLIGEN base.
    _preflight(ds, tmp_path, **new)
    _preflight(ds, tmp_path, **{"gligen.module": str(gligen_base / "gligen.safetensors")})
    _preflight(ds, tmp_path, base_model=str(gligen_base))


def test_a_module_file_on_a_plain_base_trains_and_the_base_stays(tmp_path, gligen_base):
    """ComfyUI's way: the module put on a plain base; training changes the module's tensors only."""
    from sdstudio.formats.safe_io import load_state_dict

    before, after, outputs = _train_own(tmp_path, "tiny", sets=(f"gligen.module={gligen_base / 'gligen.safetensors'}",),
                                        steps=2)
    plain = {k for k in before if k in after and not (".fuser." in k or ".position_net." in k)}
    assert plain and all(torch.equal(before[k], after[k]) for k in plain)
    start, saved = load_state_dict(gligen_base / "gligen.safetensors"), load_state_dict(outputs[0])
    assert set(start) == set(saved)
    assert any(not torch.equal(start[k].float(), saved[k].float()) for k in start)
