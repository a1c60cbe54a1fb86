"""Our one-pass pipeline on the tiny model: ControlNet + T2I-Adapter together, img2img/inpaint, seeds,
samplers, prompt weighting, input validation, PNG metadata and the generate CLI."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdstudio.errors import UserError
from sdstudio.playground.recipe import ControlNetItem, LoraItem, Recipe, RegionItem, T2IAdapterItem
from sdstudio.playground.session import Playground

BASE = Recipe(prompt="a (red:1.3) house", negative_prompt="blurry", steps=3, width=64, height=64, sampler="euler",
              cfg=5.0, seed=21)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pg():
    session = Playground(device="cpu")
    session.base("tiny")
    return session


@pytest.fixture(scope="module")
def controls(pg, tmp_path_factory):
    """A ControlNet made from the tiny UNet and a T2I-Adapter that fits it, saved as diffusers folders, plus a
    control image. Random weights: the zero-initialised ControlNet output convs are filled so it has an effect."""
    from diffusers import ControlNetModel, T2IAdapter

    d = tmp_path_factory.mktemp("controls")
    torch.manual_seed(0)
    cn = ControlNetModel.from_unet(_clean_unet())  # the session's UNet may carry adapter layers by now
    with torch.no_grad():
        for p in cn.controlnet_down_blocks.parameters():
            p.normal_(0, 0.05)
        for p in cn.controlnet_mid_block.parameters():
            p.normal_(0, 0.05)
    cn.save_pretrained(d / "cn")
    ad = T2IAdapter(in_channels=3, channels=[32, 32, 64, 64], num_res_blocks=2, downscale_factor=8,
                    adapter_type="full_adapter")
    ad.save_pretrained(d / "t2i")
    rng = np.random.default_rng(0)
    edges = (rng.random((64, 64, 3)) > 0.8).astype(np.uint8) * 255
    Image.fromarray(edges).save(d / "edges.png")
    Image.fromarray((rng.random((128, 128, 3)) * 255).astype(np.uint8)).save(d / "photo.png")
    Image.fromarray((rng.random((64, 32, 3)) * 255).astype(np.uint8)).save(d / "tall.png")
    return d


def _clean_unet():
    from sdstudio.models.loading import load_base

    return load_base("tiny").unet


def arr(images):
    return np.asarray(images[0]).astype(np.int16)


def test_controlnet_and_t2i_in_one_pass_weights_zero_equal_the_other_alone(pg, controls):
    cn = ControlNetItem(str(controls / "cn"), image=str(controls / "edges.png"), weight=1.0)
    ad = T2IAdapterItem(str(controls / "t2i"), image=str(controls / "edges.png"), weight=1.0)
    base = arr(pg.run(BASE))
    cn_alone = arr(pg.run(BASE.replace(controlnet=[cn])))
    ad_alone = arr(pg.run(BASE.replace(t2i_adapter=[ad])))
    both = arr(pg.run(BASE.replace(controlnet=[cn], t2i_adapter=[ad])))
    assert np.abs(cn_alone - base).mean() > 0.5 and np.abs(ad_alone - base).mean() > 0.5
    assert not np.array_equal(both, cn_alone) and not np.array_equal(both, ad_alone)
    ad0 = T2IAdapterItem(ad.path, image=ad.image, weight=0.0)
    cn0 = ControlNetItem(cn.path, image=cn.image, weight=0.0)
    assert np.array_equal(arr(pg.run(BASE.replace(controlnet=[cn], t2i_adapter=[ad0]))), cn_alone)
    assert np.array_equal(arr(pg.run(BASE.replace(controlnet=[cn0], t2i_adapter=[ad]))), ad_alone)
    # Two ControlNets: residuals add up (a different image than one), and a half range differs from full.
    two = arr(pg.run(BASE.replace(controlnet=[cn, ControlNetItem(cn.path, image=str(controls / "photo.png"))])))
    assert not np.array_equal(two, cn_alone)
    half = arr(pg.run(BASE.replace(controlnet=[ControlNetItem(cn.path, image=cn.image, start=0.0, end=0.5)])))
    assert not np.array_equal(half, cn_alone) and not np.array_equal(half, base)


def test_list_lengths_and_scales_are_checked(pg, controls):
    from sdstudio.playground.pipeline import generate
    from sdstudio.playground.session import load_control_model

    net = load_control_model(controls / "cn", "controlnet")
    img = Image.open(controls / "edges.png").convert("RGB")
    with pytest.raises(UserError, match="2 ControlNet.* but 1 control image"):
        generate(pg.comps, BASE, controlnets=[net, net], control_images=[img])
    with pytest.raises(UserError, match="weight"):
        generate(pg.comps, BASE, controlnets=[net], control_images=[img], control_weights=[1.0, 0.5])
    with pytest.raises(UserError, match="out of range"):
        generate(pg.comps, BASE, controlnets=[net], control_images=[img], control_weights=[float("nan")])
    with pytest.raises(UserError, match="32x64 but the output is 64x64"):
        generate(pg.comps, BASE, controlnets=[net], control_images=[Image.new("RGB", (32, 64))])
    # Through a recipe: an image of another shape is refused, not stretched.
    with pytest.raises(UserError, match="another shape"):
        pg.run(BASE.replace(controlnet=[ControlNetItem(str(controls / "cn"), image=str(controls / "tall.png"))]))
    with pytest.raises(UserError, match="does not exist"):
        pg.run(BASE.replace(controlnet=[ControlNetItem(str(controls / "nope"), image=str(controls / "edges.png"))]))
    with pytest.raises(UserError, match="not a ControlNet"):
        pg.run(BASE.replace(controlnet=[ControlNetItem(str(controls / "t2i"), image=str(controls / "edges.png"))]))


def test_seed_per_image_makes_a_batch_reproducible_image_by_image(pg):
    batch = pg.run(BASE.replace(batch=2, seed=40, sampler="euler_a"))
    second = pg.run(BASE.replace(batch=1, seed=41, sampler="euler_a"))
    assert np.abs(arr(batch[1:]) - arr(second)).max() <= 1
    assert not np.array_equal(arr(batch[:1]), arr(batch[1:]))


def test_img2img_and_inpaint(pg, controls):
    from sdstudio.playground.pipeline import to_pil

    photo = controls / "photo.png"
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save(controls / "mask.png")
    # The tiny VAE has random weights, so compare with the init image as the VAE sees it (encode -> decode).
    src = Image.open(photo).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)
    vae = pg.comps.vae
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(src, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        ref = arr(to_pil(vae.decode(vae.encode(x).latent_dist.mean).sample))
    i2i_low = arr(pg.run(BASE.replace(init_image=str(photo), strength=0.3)))
    i2i_high = arr(pg.run(BASE.replace(init_image=str(photo), strength=1.0)))
    assert np.abs(i2i_low - ref).mean() < np.abs(i2i_high - ref).mean()
    painted = arr(pg.run(BASE.replace(init_image=str(photo), mask_image=str(controls / "mask.png"), strength=0.9)))
    kept, repainted = np.abs(painted - ref)[:, 44:].mean(), np.abs(painted - ref)[:, :20].mean()
    assert kept < repainted * 0.7  # the random tiny VAE blurs across the mask edge, so not 0


def test_samplers_by_name_run_and_differ(pg):
    from sdstudio.playground.pipeline import SAMPLERS

    outs = {}
    for name in ("euler", "euler_a", "dpm++2m", "dpm++2m_karras", "ddim", "unipc", "heun"):
        assert name in SAMPLERS
        outs[name] = arr(pg.run(BASE.replace(sampler=name, steps=2)))
    assert not np.array_equal(outs["euler"], outs["euler_a"])
    with pytest.raises(UserError, match="Unknown sampler"):
        pg.run(BASE.replace(sampler="magic"))


def test_prompt_weighting_and_clip_skip_change_the_conditioning(pg):
    from sdstudio.playground import prompt

    tok, te = pg.comps.tokenizer, pg.comps.text_encoder
    with torch.no_grad():
        plain = prompt.encode("a red house", tok, te)
        weighted = prompt.encode("a (red:1.5) house", tok, te)
        skip2 = prompt.encode("a red house", tok, te, clip_skip=2)
        long = prompt.encode(" ".join(["dog"] * 100), tok, te)
        # Unweighted, one chunk: exactly what the text encoder gives for the standard padded tokens.
        ids = tok("a red house", padding="max_length", max_length=77, return_tensors="pt").input_ids
        torch.testing.assert_close(plain, te(ids)[0])
    assert not torch.allclose(plain, weighted) and not torch.allclose(plain, skip2)
    assert long.shape[1] == 154
    assert prompt.parse_weights("a (b:1.5) [c] \\(d\\)") == [("a ", 1.0), ("b", 1.5), (" ", 1.0),
                                                              ("c", pytest.approx(1 / 1.1)), (" (d)", 1.0)]


def test_recipe_toml_round_trip_and_bad_input(tmp_path):
    r = Recipe(prompt='a "quoted" prompt, <lora:style:0.6>', negative_prompt="ugly", sampler="ddim", steps=12,
               cfg=6.5, seed=9, width=96, height=128, batch=2, clip_skip=2,
               lora=[LoraItem("models/lora/a.safetensors", 0.8, text_encoder_weight=0.5, blocks=[1.0] * 17, start=0.1,
                              end=0.9)],
               controlnet=[ControlNetItem("models/controlnet/canny", image="inputs/e.png", preprocessor="canny",
                                          weight=0.7, start=0.0, end=0.8)],
               t2i_adapter=[T2IAdapterItem("models/t2i_adapter/sketch", image="inputs/s.png", weight=0.8)],
               region=[RegionItem(prompt="a cat", box=(0.0, 0.0, 0.5, 1.0), t2i_weight=0.5)])
    path = r.save(tmp_path / "r.toml")
    back = Recipe.load(path)
    assert back == r
    assert back.to_toml() == r.to_toml()
    # Region boxes as strings are parsed as numbers (never evaluated).
    text = '[[region]]\nprompt = "x"\nbox = "0.0,0.0,0.5,1.0"\n'
    assert Recipe.from_toml(text).region[0].box == (0.0, 0.0, 0.5, 1.0)
    for bad, msg in (('[[region]]\nbox = "__import__(\'os\')"\n', "four numbers"),
                     ("stpes = 3\n", "unknown key"), ("steps = 0\n", "steps"),
                     ('[[lora]]\npath = "a.safetensors"\nweight = "heavy"\n', "wrong type"),
                     ('[[lora]]\npath = "a.safetensors"\nstart = 0.8\nend = 0.2\n', "start"),
                     ("width = 100\n", "multiple of 8"), ("prompt = \n", "not valid TOML")):
        with pytest.raises(UserError, match=msg):
            Recipe.from_toml(bad)


def test_png_metadata_round_trips(pg, tmp_path):
    from sdstudio.playground.outputs import parse_a1111, read_recipe, save_images

    r = BASE.replace(batch=2, lora=[LoraItem("models/lora/a.safetensors", 0.6)], clip_skip=2)
    images = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")]
    paths = save_images(images, r, tmp_path / "out")
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    back = read_recipe(paths[1])
    assert back == r.replace(batch=1, seed=r.seed + 1)
    params = Image.open(paths[0]).text["parameters"]
    assert "Steps: 3, Sampler: Euler, CFG scale: 5, Seed: 21, Size: 64x64" in params
    assert "<lora:a:0.6>" in params and "Negative prompt: blurry" in params
    a = parse_a1111(params)
    assert (a.steps, a.sampler, a.cfg, a.seed, a.clip_skip, a.negative_prompt) == (3, "euler", 5.0, 21, 2, "blurry")
    with pytest.raises(UserError):
        read_recipe(tmp_path / "out")


def test_grid_over_lora_weight_and_cfg(pg, tmp_path, tiny_components):
    from safetensors.torch import save_file

    from sdstudio.playground import files as files_mod
    from sdstudio.playground.grid import parse_axis, run_grid
    from test_playground_stack import kohya_lora

    p = tmp_path / "g.safetensors"
    save_file(kohya_lora(tiny_components, 3), p)
    r = BASE.replace(lora=[LoraItem(str(p), 0.0)])
    reads = files_mod.FILE_READS["count"]
    grid, rows = run_grid(pg, r, parse_axis("lora_weight[0]=0,1"), parse_axis("cfg=3,6"))
    assert files_mod.FILE_READS["count"] - reads == 1  # the LoRA file once, for four cells
    assert len(rows) == 2 and len(rows[0]) == 2
    assert grid.size[0] >= 128 and grid.size[1] >= 128
    assert not np.array_equal(np.asarray(rows[0][0]), np.asarray(rows[0][1]))
    with pytest.raises(UserError, match="not understood"):
        parse_axis("colour=1,2")


def test_preprocessors_offline_and_missing_weights_named(tmp_path):
    from sdstudio.playground.preprocess import preprocess

    rng = np.random.default_rng(1)
    photo = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))
    for name in ("canny", "lineart", "shuffle"):
        out = preprocess(photo, name)
        assert out.size == (64, 64) and out.mode == "RGB"
        assert not np.array_equal(np.asarray(out), np.asarray(photo))
    with pytest.raises(UserError, match="ControlNetHED.pth"):
        preprocess(photo, "hed", tmp_path)
    with pytest.raises(UserError, match="body_pose_model.pth"):
        preprocess(photo, "openpose", tmp_path)


def test_generate_cli_writes_pngs_and_one_line_errors(tmp_path, controls, tiny_components, monkeypatch, capsys):
    from safetensors.torch import save_file

    from sdstudio.cli import main
    from test_playground_stack import kohya_lora

    monkeypatch.setenv("SDSTUDIO_HOME", str(tmp_path / "ws"))
    (tmp_path / "ws" / "models" / "lora").mkdir(parents=True)
    save_file(kohya_lora(tiny_components, 1), tmp_path / "ws" / "models" / "lora" / "style.safetensors")
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'prompt = "a dog <lora:style:0.5>"\nsteps = 2\nwidth = 64\nheight = 64\nsampler = "euler"\n'
                      f'[[controlnet]]\npath = "{controls / "cn"}"\nimage = "{controls / "edges.png"}"\n')
    assert main(["generate", str(recipe), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert len(pngs) == 1
    from sdstudio.playground.outputs import read_recipe

    assert read_recipe(pngs[0]).controlnet[0].path == str(controls / "cn")
    capsys.readouterr()
    bad = tmp_path / "bad.toml"
    bad.write_text('[[lora]]\npath = "models/lora/missing.safetensors"\nweight = 1.0\nwidth = 64\n')
    bad.write_text('width = 64\nheight = 64\nsteps = 1\n[[lora]]\npath = "models/lora/missing.safetensors"\n')
    assert main(["generate", str(bad), "--out", str(tmp_path / "out2"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing.safetensors" in err and len(err.splitlines()) == 1


def test_base_model_from_the_workspace_and_paths_outside_refused(workspace, tiny_dir):
    import shutil

    shutil.copytree(tiny_dir, workspace.root / "models" / "checkpoints" / "mine")
    session = Playground(lambda p: workspace.resolve(p, must_exist=True), device="cpu")
    comps = session.base("models/checkpoints/mine")
    assert comps.source == workspace.root / "models" / "checkpoints" / "mine"
    with pytest.raises(UserError, match="outside the workspace"):
        session.base(str(tiny_dir))
    with pytest.raises(UserError, match="outside the workspace"):
        session.run(BASE.replace(lora=[LoraItem("../x.safetensors")]))


def test_grid_checkpoint_axis_lists_a_runs_checkpoints_in_step_order(tmp_path):
    from sdstudio.playground.grid import expand_checkpoints, grid_recipes, parse_axis

    run = tmp_path / "runs" / "mine"
    for step in (10, 2):
        (run / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step}" / "mine.safetensors").write_bytes(b"x")
    (run / "mine.safetensors").write_bytes(b"x")
    axis = expand_checkpoints(parse_axis("checkpoint=runs/mine"), lambda p: tmp_path / p)
    assert [Path(v).relative_to(run).as_posix() for v in axis.values] == [
        "checkpoints/step-2/mine.safetensors", "checkpoints/step-10/mine.safetensors", "mine.safetensors"]
    assert [axis.label(v) for v in axis.values] == ["step-2", "step-10", "mine"]
    rows = grid_recipes(BASE.replace(lora=[LoraItem("x.safetensors", 0.7)]), axis, parse_axis("seed=1,2"))
    assert len(rows) == 2 and [r.lora[0].path for r in rows[0]] == axis.values and rows[1][0].seed == 2
    with pytest.raises(UserError, match="LoRA #2"):
        grid_recipes(BASE.replace(lora=[LoraItem("x.safetensors")]), parse_axis("lora_weight[1]=0,1"), None)
