"""GLIGEN in our pipeline on the tiny model: the tiny GLIGEN model and its ComfyUI-layout module file, boxes that
are exactly off when absent or scheduled to 0, the grounding tensors the UNet receives, a module file applied to a
plain base and taken off again, GLIGEN together with the rest of the stack, the recipe and PNG round trips, and
the one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdstudio.errors import UserError
from sdstudio.playground.recipe import GroundingItem, Recipe
from sdstudio.playground.session import Playground

BASE = Recipe(prompt="a house by a lake", negative_prompt="blurry", steps=4, width=64, height=64, sampler="euler",
              cfg=5.0, seed=3)
CAR = GroundingItem("a red car", (0.05, 0.5, 0.45, 0.95))
DOG = GroundingItem("a small dog", (0.55, 0.1, 0.95, 0.6))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def arr(images):
    return np.asarray(images[0]).astype(np.int16)


@pytest.fixture(scope="module")
def gligen_files(tmp_path_factory, tiny_dir):
    """`sdstudio tiny-model OUT --gligen --single-file F`: the gated diffusers folder, its module file and the
    original-layout single file."""
    from sdstudio.cli import main

    d = tmp_path_factory.mktemp("gligen")
    assert main(["tiny-model", str(d / "tg"), "--gligen", "--single-file", str(d / "tg.safetensors")]) == 0
    return d


class On:
    """A Playground session that stays on one base: every recipe it runs is given that base."""

    def __init__(self, ref: str) -> None:
        self.session, self.ref = Playground(device="cpu"), ref
        self.session.base(ref)

    def run(self, recipe: Recipe):
        return self.session.run(recipe.replace(base_model=self.ref))

    @property
    def comps(self):
        return self.session.comps

    @property
    def gligen(self):
        return self.session.gligen


@pytest.fixture(scope="module")
def plain():
    return On("tiny")


@pytest.fixture(scope="module")
def gated(gligen_files):
    return On(str(gligen_files / "tg"))


def test_tiny_gligen_model_is_tiny_plus_gated_layers_and_its_module_file_reads_like_comfyui(gligen_files,
                                                                                            tiny_components):
    from diffusers.models.attention import GatedSelfAttentionDense

    from sdstudio.formats.gligen import module_to_unet, unet_to_module
    from sdstudio.formats.kinds import detect_kind
    from sdstudio.formats.safe_io import load_state_dict
    from sdstudio.models.loading import load_base
    from sdstudio.models.tiny import add_gligen

    comps = load_base(str(gligen_files / "tg"))
    assert comps.unet.config.attention_type == "gated"
    sd = comps.unet.state_dict()
    plain = tiny_components.unet.state_dict()
    # Every weight of the plain tiny UNet is there, bit for bit; the rest is GLIGEN's.
    assert all(torch.equal(sd[k], v) for k, v in plain.items())
    extra = sorted(set(sd) - set(plain))
    assert extra and all(".fuser." in k or k.startswith("position_net.") for k in extra)
    # Built from a fixed seed: the same bytes every time.
    again = add_gligen(tiny_components.unet).state_dict()
    assert all(torch.equal(again[k], sd[k]) for k in extra)
    # The gates start open, so boxes have an effect (diffusers starts them shut).
    assert all(float(sd[k]) == 1.0 for k in extra if k.endswith(("alpha_attn", "alpha_dense")))

    module = load_state_dict(gligen_files / "tg" / "gligen.safetensors")
    assert detect_kind(gligen_files / "tg" / "gligen.safetensors") == "gligen"
    assert detect_kind(gligen_files / "tg.safetensors") == "checkpoint"
    # ComfyUI's load_gligen: per input/middle/output block index, the keys with ".fuser." build one
    # GatedSelfAttentionDense (strict names), and position_net.* a PositionNet sized from two keys.
    fusers = []
    for part in ("input_blocks", "middle_block", "output_blocks"):
        for b in range(20):
            sub = {k.split(".fuser.")[-1]: v for k, v in module.items() if f"{part}.{b}." in k and ".fuser." in k}
            if sub:
                q, kdim = sub["linear.weight"].shape
                ref = GatedSelfAttentionDense(q, kdim, 8, q // 8)
                assert set(sub) == set(ref.state_dict()), f"{part}.{b}"
                fusers.append(f"{part}.{b}")
    assert len(fusers) == 16  # 6 down, 1 mid, 9 up: every transformer block of SD 1.5's layout
    assert module["position_net.null_positive_feature"].shape[0] == 32
    assert module["position_net.linears.4.weight"].shape[0] == 32
    assert set(module) == set(unet_to_module(sd, comps.unet.config))
    # Both ways, exactly.
    back = module_to_unet(module, comps.unet.config)
    assert set(back) == set(extra) and all(torch.equal(back[k], sd[k]) for k in extra)


def test_no_boxes_or_a_fraction_of_zero_is_the_base_exactly(plain, gated):
    base = arr(plain.run(BASE))
    assert np.array_equal(arr(gated.run(BASE)), base)  # a gated checkpoint with no boxes: its base
    grounded = BASE.replace(grounding=[CAR, DOG], grounding_fraction=0.5)
    assert np.array_equal(arr(gated.run(grounded.replace(grounding_fraction=0.0))), base)
    off = grounded.replace(grounding=[GroundingItem(CAR.phrase, CAR.box, enabled=False)])
    assert np.array_equal(arr(gated.run(off)), base)
    on = arr(gated.run(grounded))
    assert np.abs(on - base).mean() > 1.0
    assert not np.array_equal(arr(gated.run(grounded.replace(grounding_fraction=1.0))), on)


def test_the_unet_gets_each_box_and_phrase_on_the_conditional_rows_for_the_scheduled_steps(gated):
    """Watch the position net's inputs: boxes in x0,y0,x1,y1 order, padded to 30 with a mask, the objects on the
    conditional rows only (CFG), each phrase's pooled text feature, and int(fraction * steps) grounded calls."""
    comps = gated.comps
    calls = []
    handle = comps.unet.position_net.register_forward_hook(
        lambda m, args, kwargs, out: calls.append({k: v.clone() for k, v in kwargs.items()}), with_kwargs=True)
    try:
        gated.run(BASE.replace(batch=2, steps=5, grounding=[CAR, DOG], grounding_fraction=0.6))
    finally:
        handle.remove()
    assert len(calls) == 3  # int(0.6 * 5)
    c = calls[0]
    boxes, masks, emb = c["boxes"], c["masks"], c["positive_embeddings"]
    assert boxes.shape == (4, 30, 4) and masks.shape == (4, 30)  # [negative x 2, positive x 2]
    assert torch.equal(masks[:2], torch.zeros(2, 30))
    assert torch.equal(masks[2:, :2], torch.ones(2, 2)) and not masks[2:, 2:].any()
    assert torch.allclose(boxes[3, 0], torch.tensor(CAR.box)) and torch.allclose(boxes[3, 1], torch.tensor(DOG.box))
    tok, te = comps.tokenizer, comps.text_encoder
    with torch.no_grad():
        dog = te(tok(["a small dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids).pooler_output
    assert torch.allclose(emb[2, 1], dog[0], atol=1e-6) and not emb[2, 2:].any()
    assert len(calls) == 3 and all(torch.equal(k["boxes"], boxes) for k in calls)


def test_a_module_file_on_a_plain_base_equals_the_gated_checkpoint_and_comes_off_again(plain, gated, gligen_files):
    module = str(gligen_files / "tg" / "gligen.safetensors")
    grounded = BASE.replace(grounding=[CAR, DOG], grounding_fraction=1.0)
    want = arr(gated.run(grounded))
    base = arr(plain.run(BASE))
    reads = plain.gligen.reads
    got = arr(plain.run(grounded.replace(gligen=module)))
    assert np.array_equal(got, want)
    assert np.array_equal(arr(plain.run(grounded.replace(gligen=module, seed=4))),
                          arr(gated.run(grounded.replace(seed=4))))
    assert plain.gligen.reads == reads + 1  # read once, kept while the recipe names it
    # Dropped from the recipe: the plain base again, exactly, and boxes without GLIGEN layers are refused.
    assert np.array_equal(arr(plain.run(BASE)), base)
    with pytest.raises(UserError, match="no GLIGEN layers"):
        plain.run(grounded)
    assert not hasattr(plain.comps.unet, "position_net")


def test_a_single_file_gligen_checkpoint_brings_its_own_layers(gligen_files, gated):
    grounded = BASE.replace(grounding=[CAR], grounding_fraction=1.0)
    session = Playground(device="cpu")
    got = arr(session.run(grounded.replace(base_model=str(gligen_files / "tg.safetensors"))))
    assert np.array_equal(got, arr(gated.run(grounded)))


def test_gligen_runs_in_one_pass_with_loras_controlnet_t2i_adapter_regions_and_embeddings(gated, tmp_path,
                                                                                       tiny_components):
    from diffusers import ControlNetModel, T2IAdapter
    from PIL import Image
    from safetensors.torch import save_file

    from sdstudio.playground.recipe import (ControlNetItem, EmbeddingItem, LoraItem, RegionItem,
                                            T2IAdapterItem)
    from test_playground_stack import kohya_lora

    save_file(kohya_lora(tiny_components, 1, scale=0.1), tmp_path / "style.safetensors")
    torch.manual_seed(0)
    cn = ControlNetModel.from_unet(tiny_components.unet)
    with torch.no_grad():
        for p in cn.controlnet_down_blocks.parameters():
            p.normal_(0, 0.05)
    cn.save_pretrained(tmp_path / "cn")
    T2IAdapter(in_channels=3, channels=[32, 32, 64, 64], num_res_blocks=1, downscale_factor=8).save_pretrained(
        tmp_path / "t2i")
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) > 0.7).astype(np.uint8) * 255).save(
        tmp_path / "edges.png")
    save_file({"emb_params": torch.randn(1, 32, generator=torch.Generator().manual_seed(1))},
              tmp_path / "shiny.safetensors")
    stack = BASE.replace(prompt="a shiny house by a lake",
                         lora=[LoraItem(str(tmp_path / "style.safetensors"), 0.8)],
                         embedding=[EmbeddingItem(str(tmp_path / "shiny.safetensors"), "shiny")],
                         controlnet=[ControlNetItem(str(tmp_path / "cn"), image=str(tmp_path / "edges.png"))],
                         t2i_adapter=[T2IAdapterItem(str(tmp_path / "t2i"), image=str(tmp_path / "edges.png"))],
                         region=[RegionItem("a boat", box=(0.0, 0.5, 1.0, 1.0))])
    without = arr(gated.run(stack))
    with_boxes = arr(gated.run(stack.replace(grounding=[GroundingItem("a shiny car", CAR.box), DOG],
                                             grounding_fraction=1.0)))
    assert np.abs(with_boxes - without).mean() > 1.0
    # And the boxes off again: the same stack, exactly.
    assert np.array_equal(arr(gated.run(stack)), without)


def test_recipe_toml_and_png_metadata_keep_the_boxes(gated, tmp_path):
    from PIL import Image

    from sdstudio.playground.outputs import read_recipe, save_images

    text = """
prompt = "a street"
steps = 2
width = 64
height = 64
gligen = "models/gligen/tiny.safetensors"
grounding_fraction = 0.4

[[grounding]]
phrase = "a red car"
box = [0.1, 0.5, 0.4, 0.9]

[[grounding]]
phrase = "a dog"
box = "0.6, 0.2, 0.9, 0.7"
enabled = false
"""
    r = Recipe.from_toml(text)
    assert r.grounding == [GroundingItem("a red car", (0.1, 0.5, 0.4, 0.9)),
                           GroundingItem("a dog", (0.6, 0.2, 0.9, 0.7), enabled=False)]
    assert r.gligen == "models/gligen/tiny.safetensors" and r.grounding_fraction == 0.4
    assert Recipe.from_toml(r.to_toml()) == r
    assert "[[grounding]]" in r.to_toml()

    run = BASE.replace(grounding=[CAR, DOG], grounding_fraction=0.75, base_model=gated.ref)
    paths = save_images(gated.run(run), run, tmp_path)
    back = read_recipe(paths[0])
    assert back.grounding == [CAR, DOG] and back.grounding_fraction == 0.75 and back.base_model == gated.ref
    assert np.array_equal(arr(gated.run(back)), np.asarray(Image.open(paths[0])).astype(np.int16))


def test_a_grid_axis_over_the_grounding_fraction():
    from sdstudio.playground.grid import grid_recipes, parse_axis

    axis = parse_axis("grounding_fraction=0, 0.5, 1")
    cells = grid_recipes(BASE.replace(grounding=[CAR]), axis, None)[0]
    assert [c.grounding_fraction for c in cells] == [0.0, 0.5, 1.0] and all(c.grounding == [CAR] for c in cells)
    assert axis.label(0.5) == "0.5" and axis.title() == "GLIGEN steps"  # short headers, the title names the axis


@pytest.mark.parametrize("item, message", [
    (dict(phrase="a car", box=[0.1, 0.2, 1.3, 0.8]), "outside the image"),
    (dict(phrase="a car", box=[-0.1, 0.2, 0.5, 0.8]), "outside the image"),
    (dict(phrase="a car", box=[0.5, 0.2, 0.5, 0.8]), "zero area"),
    (dict(phrase="a car", box=[0.1, 0.8, 0.5, 0.2]), "zero area"),
    (dict(phrase="  ", box=[0.1, 0.2, 0.5, 0.8]), "no phrase"),
    (dict(phrase="a car", box="0.1, 0.2, __import__('os').getcwd(), 1"), "not four numbers"),
    (dict(phrase="a car", box=[0.1, 0.2, 0.5]), "exactly four numbers"),
    (dict(phrase="a car", box=[0.1, 0.2, 0.5, 0.8], colour="red"), "unknown key"),
])
def test_bad_grounding_items_are_one_line_errors(item, message):
    with pytest.raises(UserError, match=message) as info:
        Recipe.from_dict(dict(BASE.to_dict(), grounding=[item]))
    assert "\n" not in str(info.value)


def test_bad_grounding_at_generation_time_is_one_line(plain, gated, gligen_files, tmp_path):
    long = GroundingItem(" ".join(["tiny"] * 80), (0.1, 0.1, 0.5, 0.5))
    with pytest.raises(UserError, match="80 tokens; GLIGEN reads at most 75") as info:
        gated.run(BASE.replace(grounding=[long]))
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="has no GLIGEN layers, so it cannot place phrases in boxes: pick a GLIGEN"):
        plain.run(BASE.replace(grounding=[CAR]))
    with pytest.raises(UserError, match="at most 30"):
        gated.run(BASE.replace(grounding=[CAR] * 31))
    with pytest.raises(UserError, match="grounding_fraction"):
        gated.run(BASE.replace(grounding=[CAR], grounding_fraction=1.5))
    # A module for another model (a 768-wide SD 1.x GLIGEN on the 32-wide tiny base) and a file that is no GLIGEN.
    from safetensors.torch import save_file

    from sdstudio.formats.safe_io import load_state_dict

    module = load_state_dict(gligen_files / "tg" / "gligen.safetensors")
    module["position_net.null_positive_feature"] = torch.zeros(768)
    save_file(module, tmp_path / "sd15.safetensors")
    with pytest.raises(UserError, match="768-wide text features, this base has 32"):
        plain.run(BASE.replace(grounding=[CAR], gligen=str(tmp_path / "sd15.safetensors")))
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, tmp_path / "lora.safetensors")
    with pytest.raises(UserError, match="not a GLIGEN model"):
        plain.run(BASE.replace(grounding=[CAR], gligen=str(tmp_path / "lora.safetensors")))
    assert not hasattr(plain.comps.unet, "position_net")


@pytest.fixture(scope="module")
def placing(tmp_path_factory, tiny_components):
    """A GLIGEN module that can place things on the random tiny base, with the coordinate T2I-Adapter it reads
    positions from (tests/gligen_fixture.py says how and why)."""
    import gligen_fixture

    return gligen_fixture.build(tiny_components, tmp_path_factory.mktemp("placing"), ["a red car"])


def test_moving_a_box_moves_where_the_output_changes(placing, plain):
    """Difference maps against the same recipe without boxes: most of the change is inside the box, and it follows
    the box from left to right and from top to bottom (a transposed or misplaced box would fail this)."""
    from gligen_fixture import ADAPTER_WEIGHT, HALVES, SIZE

    from sdstudio.playground.recipe import T2IAdapterItem

    base = BASE.replace(width=SIZE, height=SIZE, gligen=str(placing["module"]), grounding_fraction=1.0,
                        t2i_adapter=[T2IAdapterItem(str(placing["adapter"]), image=str(placing["image"]),
                                                    weight=ADAPTER_WEIGHT)])
    ref = arr(plain.run(base)).astype(np.float32)
    maps = {}
    for name, box in HALVES.items():
        out = arr(plain.run(base.replace(grounding=[GroundingItem("a red car", box)]))).astype(np.float32)
        d = np.abs(out - ref).mean(-1)
        x0, y0, x1, y1 = (round(v * SIZE) for v in box)
        inside = np.zeros_like(d, dtype=bool)
        inside[y0:y1, x0:x1] = True
        assert d[inside].mean() > 1.0, name  # a visible change (in 0-255 levels)
        assert d[inside].mean() > 1.6 * d[~inside].mean(), name
        maps[name] = d
    half = SIZE // 2
    assert maps["left"][:, :half].mean() > maps["right"][:, :half].mean()
    assert maps["right"][:, half:].mean() > maps["left"][:, half:].mean()
    assert maps["top"][:half].mean() > maps["bottom"][:half].mean()
    assert maps["bottom"][half:].mean() > maps["top"][half:].mean()
