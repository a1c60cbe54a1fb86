"""ControlNet and T2I-Adapter trainers on the tiny model: exact resume, learning on a synthetic task while the base
UNet stays bit-identical, the original-layout ControlNet file mapped key by key, the Playground at weight 0
(the base, pixel for pixel) and weight 1 (changed), and the SDXL adapter layout.

(The contract test, tests/test_train_contract.py, runs both through the registry as well.)"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdstudio.events import Preview, Step
from sdstudio.jobs import Commands, Stopped
from sdstudio.train.config import load_config
from sdstudio.train.loop import train
from train_helpers import fast_sets, make_kohya_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")
METHODS = ("controlnet", "t2i_adapter")


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dir):
    """Per method: an unbroken 4-step run, and the same run stopped at step 2 and resumed; the resumed run's
    outputs are published into a workspace, as the Train tab and the CLI do."""
    from sdstudio.publish import publish
    from sdstudio.workspace import Workspace

    root = tmp_path_factory.mktemp("cond-runs")
    ds = make_kohya_dataset(root / "ds", n=3, with_cond=True)
    ws = Workspace.open(root / "ws")
    out = {"ws": ws, "ds": ds}
    for name in METHODS:
        opts = dict(method=name, max_steps=4, learning_rate=1e-3, lr_scheduler="cosine", warmup_steps=1,
                    caption_dropout=0.3, sample_prompts='["a photo of sks person"]')
        train(load_config(None, fast_sets(ds, root / f"{name}-a", **opts)), lambda e: None)
        cfg = load_config(None, fast_sets(ds, root / f"{name}-b", **opts))
        commands, events = Commands(), []

        def stop_at_2(ev, commands=commands, events=events):
            events.append(ev)
            if isinstance(ev, Step) and ev.step == 2:
                commands.stop()

        with pytest.raises(Stopped):
            train(cfg, stop_at_2, commands)
        outputs = train(cfg, events.append, resume=True, publish=lambda paths: publish(ws, paths))
        out[name] = dict(a=root / f"{name}-a", b=root / f"{name}-b", outputs=outputs, events=events)
    return out


@pytest.mark.parametrize("name", METHODS)
def test_stop_and_resume_repeats_the_unbroken_run(runs, name):
    a, b = _log(runs[name]["a"]), _log(runs[name]["b"])
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # exact: same data, conditions, noise, weights
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    previews = [e for e in runs[name]["events"] if isinstance(e, Preview)]
    assert previews and all(e.conditions and Path(e.conditions[0]).is_file() for e in previews)


def test_controlnet_outputs_and_the_original_layout_file(runs):
    """The diffusers folder and the single file hold the same weights; every key of the single file is in
    lllyasviel's layout and diffusers' own converter maps each one back to the diffusers model exactly."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from sdstudio.formats.kinds import detect_kind
    from sdstudio.formats.safe_io import load_state_dict, read_safetensors_metadata

    folder, single = sorted(runs["controlnet"]["outputs"], key=lambda p: p.is_file())
    assert folder.is_dir() and single.suffix == ".safetensors"
    assert detect_kind(folder) == detect_kind(single) == "controlnet"
    net = ControlNetModel.from_pretrained(str(folder))
    ref = net.state_dict()
    sd = load_state_dict(single)
    assert len(sd) == len(ref)
    families = {k.split(".")[0] for k in sd}
    assert families == {"time_embed", "input_blocks", "zero_convs", "input_hint_block", "middle_block",
                        "middle_block_out"}
    assert sum(k.startswith("zero_convs.") for k in sd) == 2 * len(net.controlnet_down_blocks)
    back = convert_controlnet_checkpoint(dict(sd), dict(net.config))
    assert set(back) == set(ref)  # every key maps to a diffusers key, and none is left out
    for k, v in ref.items():
        assert torch.equal(back[k], v), k
    assert read_safetensors_metadata(single)["modelspec.architecture"] == "stable-diffusion-v1/controlnet"
    # Our own reader (the Playground's) gives the same model.
    from sdstudio.formats.controlnet import load_original_controlnet
    from sdstudio.models.loading import load_base

    again = load_original_controlnet(single, load_base("tiny").unet)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ref.items())


def test_published_into_models_and_listed_for_the_playground(runs):
    from sdstudio.library import scan_models

    ws = runs["ws"]
    assert (ws.models("controlnet") / "my-lora").is_dir()
    assert (ws.models("controlnet") / "my-lora.safetensors").is_file()
    assert (ws.models("t2i_adapter") / "my-lora").is_dir()
    kinds = {(m.kind, Path(m.path).name) for m in scan_models(ws)}
    assert {("controlnet", "my-lora"), ("controlnet", "my-lora.safetensors"), ("t2i_adapter", "my-lora")} <= kinds


@pytest.mark.parametrize("name", METHODS)
def test_playground_weight_zero_is_the_base_and_weight_one_changes_it(runs, name):
    from sdstudio.playground.recipe import ControlNetItem, Recipe, T2IAdapterItem
    from sdstudio.playground.session import Playground

    ws = runs["ws"]
    cond = Image.open(runs["ds"] / "img" / "2_sks person" / "000.cond.png").convert("RGB").resize((64, 64))
    cond.save(ws.root / "inputs" / "cond.png")
    pg = Playground(lambda p: ws.resolve(p, must_exist=True), device="cpu")
    base = Recipe(base_model="tiny", prompt="a photo of sks person", steps=3, width=64, height=64, cfg=5.0, seed=3,
                  sampler="euler")
    item_cls = ControlNetItem if name == "controlnet" else T2IAdapterItem
    paths = [f"models/{name}/my-lora"] + (["models/controlnet/my-lora.safetensors"] if name == "controlnet" else [])

    def run(**kw):
        return np.asarray(pg.run(base.replace(**kw))[0])

    plain = run()
    for path in paths:
        item = item_cls(path, image="inputs/cond.png")
        zero = run(**{name: [item_cls(path, image="inputs/cond.png", weight=0.0)]})
        one = run(**{name: [item]})
        assert np.array_equal(zero, plain), path  # weight 0: the base output, pixel for pixel
        assert np.abs(one.astype(int) - plain.astype(int)).max() > 0, path  # weight 1: the trained net acts
    if name == "controlnet":  # the folder and the original-layout file are the same ControlNet
        folder_img = run(controlnet=[ControlNetItem(paths[0], image="inputs/cond.png")])
        single_img = run(controlnet=[ControlNetItem(paths[1], image="inputs/cond.png")])
        assert np.array_equal(folder_img, single_img)


def _shapes_dataset(root: Path, n: int = 8) -> Path:
    """Red squares at random places on grey; each condition is the square's outline (its edge map)."""
    folder = root / "img" / "1_shape"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.full((64, 64, 3), 40, np.uint8)
        x, y = rng.integers(4, 36, 2)
        s = int(rng.integers(16, 26))
        img[y:y + s, x:x + s] = (230, 60, 60)
        edges = np.zeros((64, 64), np.uint8)
        edges[y, x:x + s] = edges[y + s - 1, x:x + s] = edges[y:y + s, x] = edges[y:y + s, x + s - 1] = 255
        Image.fromarray(img).save(folder / f"{i}.png")
        Image.fromarray(edges).convert("RGB").save(folder / f"{i}.cond.png")
        (folder / f"{i}.txt").write_text("a red square")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name,steps,lr,drop", [("controlnet", 80, "1e-3", 0.7), ("t2i_adapter", 150, "3e-3", 0.95)])
def test_learns_a_synthetic_task_while_the_base_unet_stays_bit_identical(tmp_path, name, steps, lr, drop):
    from sdstudio.data.dataset import TrainDataset
    from sdstudio.data.folder import read_dataset
    from sdstudio.methods.base import RunInfo
    from sdstudio.methods.registry import get_method
    from sdstudio.models.loading import load_base
    from sdstudio.train.loop import _make_accelerator, _make_batch, _seed_for, run_loop
    from sdstudio.train.noise import cubic_timesteps, denoising_loss

    ds = _shapes_dataset(tmp_path / "ds")
    cfg = load_config(None, fast_sets(ds, tmp_path / "run", method=name, max_steps=steps, batch_size=4,
                                      learning_rate=lr, buckets="false", sample_prompts="[]"))
    method = get_method(name)()
    data = TrainDataset(read_dataset(ds), cfg, conditioning=method.conditioning)
    acc, dtype = _make_accelerator(cfg, "cpu")
    c = load_base("tiny", device="cpu", dtype=dtype)
    before = {k: v.clone() for k, v in c.unet.state_dict().items()}
    method.run = RunInfo(cfg=cfg, run_dir=tmp_path / "run", layout=data.layout)
    sampler = cubic_timesteps if name == "t2i_adapter" else None

    def fixed_loss(fn) -> float:  # the same 6 batches, noise and timesteps every time
        out = []
        for g in range(6):
            batch = _make_batch(c, data, cfg, g, None, None, "cpu", dtype, seed=_seed_for("eval", g))
            with torch.no_grad():
                out.append(float(fn(batch)))
        return float(np.mean(out))

    start = fixed_loss(lambda b: denoising_loss(c, b, cfg, timesteps=sampler))  # the base alone
    if name == "controlnet":  # zero convolutions: a new ControlNet starts exactly at the base
        torch.manual_seed(0)
        method.prepare(c, cfg)
        assert fixed_loss(lambda b: method.loss(c, b, 0)) == start
    run_loop(method, c, data, cfg, lambda e: None, Commands(), acc=acc, run_dir=tmp_path / "run")
    trained = fixed_loss(lambda b: method.loss(c, b, 0))
    assert trained < drop * start, (start, trained)
    assert all(torch.equal(before[k], v) for k, v in c.unet.state_dict().items())  # the base never changed


def test_sdxl_base_gets_the_xl_adapter_layout():
    """An SDXL-shaped UNet (3 down blocks, the first without attention) gets diffusers' XL adapter, whose four
    features its three down blocks and mid block take."""
    from diffusers import T2IAdapter, UNet2DConditionModel

    from sdstudio.errors import UserError
    from sdstudio.methods.t2i_adapter import adapter_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64, 64), layers_per_block=2, sample_size=16,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()
    cfg = adapter_config(unet.config, xl=True)
    assert cfg["adapter_type"] == "full_adapter_xl" and cfg["channels"] == [32, 64, 64, 64]
    adapter = T2IAdapter(**cfg).eval()
    x, t, ehs = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    feats = adapter(torch.rand(1, 3, 128, 128))
    with torch.no_grad():
        plain = unet(x, t, ehs).sample
        steered = unet(x, t, ehs, down_intrablock_additional_residuals=[f for f in feats]).sample
    assert steered.shape == plain.shape and not torch.equal(steered, plain)
    with pytest.raises(UserError, match="light"):
        adapter_config(unet.config, xl=True, adapter_type="light")


def test_estimate_asks_the_method():
    from sdstudio.methods.controlnet import controlnet_parameters
    from sdstudio.methods.t2i_adapter import adapter_parameters
    from sdstudio.train.estimate import estimate

    # Published sizes: SD 1.5 ControlNet 361 M parameters, TencentARC's full SD 1.x adapter 77 M, light ~19 M.
    assert controlnet_parameters("sd1") == 361_279_120
    assert adapter_parameters("sd1", "full", False) == 77_369_280 and adapter_parameters("sd1", "light", False) < 2e7
    sets = ["base_model=stable-diffusion-v1-5/stable-diffusion-v1-5", "resolution=512", "batch_size=2"]
    est = {m: estimate(load_config(None, sets + [f"method={m}"])) for m in ("lora", "t2i_adapter", "controlnet")}
    assert est["lora"].vram_gb < est["t2i_adapter"].vram_gb < est["controlnet"].vram_gb
    assert est["lora"].minutes < est["t2i_adapter"].minutes < est["controlnet"].minutes
