"""Regional sampling on the tiny model: two regions make an image; a whole-image region equals plain sampling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdstudio.errors import UserError
from sdstudio.concepts.regions import Region, generate, parse_box

KW = dict(steps=3, guidance=5.0, seed=11, height=64, width=64, output_type="np")


def test_two_regions_make_an_image_and_full_box_equals_plain(tiny_components):
    c = tiny_components
    prompt, neg = "two people in a park", "blurry"
    regions = [Region("a red robot", "0, 0, 0.5, 1"), Region("a blue dog", [0.4, 0, 1, 1], negative_prompt="cat")]
    two = generate(c, prompt, neg, regions, **KW)
    plain_ours = generate(c, prompt, neg, [], **KW)
    assert two.shape == (64, 64, 3) and np.isfinite(two).all()
    assert np.abs(two - plain_ours).max() > 1e-3  # the regions changed the picture
    # A box over the whole image with the global prompt is plain sampling, bit for bit up to float noise; and
    # plain diffusers sampling with the stock processors gives the same image.
    full = generate(c, prompt, neg, [Region(prompt, (0, 0, 1, 1))], **KW)
    g = torch.Generator().manual_seed(11)
    stock = c.pipeline()(prompt, negative_prompt=neg, num_inference_steps=3, guidance_scale=5.0, height=64,
                         width=64, generator=g, output_type="np").images[0]
    np.testing.assert_allclose(plain_ours, stock, atol=1e-5)
    np.testing.assert_allclose(full, stock, atol=1e-5)
    # the processors were restored
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in c.unet.attn_processors.values())


def test_region_t2i_weights_scale_adapter_features(tiny_components):
    from diffusers import T2IAdapter

    from sdstudio.concepts.regions import region_adapter_weights

    torch.manual_seed(0)
    adapter = T2IAdapter(in_channels=3, channels=[32, 32, 64, 64], num_res_blocks=1, downscale_factor=8)
    x = torch.rand(1, 3, 64, 64)
    base = adapter(x)
    regs = [Region("x", (0, 0, 0.5, 1), t2i_weight=0.0)]
    with region_adapter_weights(adapter, regs, weight=2.0):
        scaled = adapter(x)
    f0, s0 = base[0], scaled[0]
    assert torch.allclose(s0[..., :, : f0.shape[-1] // 2], torch.zeros(()))
    assert torch.allclose(s0[..., :, f0.shape[-1] // 2:], 2 * f0[..., :, f0.shape[-1] // 2:])
    img = generate(tiny_components, "a robot", "", regs, adapter=adapter, adapter_image=torch.rand(1, 3, 64, 64),
                   **KW)
    assert img.shape == (64, 64, 3)


@pytest.mark.parametrize("bad", ["__import__('os')", "0,0,1", "0, 0, 2, 1", "0.5, 0, 0.2, 1", "a,b,c,d", [1, 2]])
def test_box_parsing_is_safe(bad):
    with pytest.raises(UserError):
        parse_box(bad)


def test_box_parsing_accepts_common_forms():
    assert parse_box("[0.1, 0.2, 0.6, 1]") == (0.1, 0.2, 0.6, 1.0)
    assert parse_box("0 0 .5 1") == (0.0, 0.0, 0.5, 1.0)
    assert parse_box((0, 0.25, 1, 0.75)) == (0.0, 0.25, 1.0, 0.75)


def test_overlapping_regions_average_and_outside_keeps_global():
    """One cross-attention layer: inside two overlapping boxes the output is the mean of the two region
    prompts' attention; inside one box it is that box's; outside every box it is the global prompt's."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from sdstudio.concepts.layerwise import AttnContext
    from sdstudio.concepts.regions import RegionAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
    hs = torch.randn(1, 16, 16)  # a 4x4 feature map
    glob, ra, rb = torch.randn(1, 5, 8), torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    ctx = AttnContext()
    ctx.size = (4, 4)
    a, b = Region("a", (0, 0, 0.75, 1)), Region("b", (0.5, 0, 1, 1))  # columns 0-2 and 2-3 overlap in column 2
    ctx.regions = [(a, ra), (b, rb)]
    out = RegionAttnProcessor(0, ctx)(attn, hs, glob)
    ref = AttnProcessor2_0()
    oa, ob, og = ref(attn, hs, ra), ref(attn, hs, rb), ref(attn, hs, glob)
    grid = lambda t: t.reshape(4, 4, -1)  # noqa: E731
    assert torch.allclose(grid(out)[:, :2], grid(oa)[:, :2], atol=1e-6)
    assert torch.allclose(grid(out)[:, 2], (grid(oa)[:, 2] + grid(ob)[:, 2]) / 2, atol=1e-6)
    assert torch.allclose(grid(out)[:, 3], grid(ob)[:, 3], atol=1e-6)
    ctx.regions = [(Region("c", (0, 0, 0.5, 0.5)), ra)]  # outside the box: the global prompt
    out = RegionAttnProcessor(0, ctx)(attn, hs, glob)
    assert torch.allclose(grid(out)[2:, :], grid(og)[2:, :], atol=1e-6)


def test_regions_on_an_sdxl_shaped_model(tiny_dir):
    """[[region]] items through the Playground pipeline on SDXL (two encoders): runs, and a whole-image region
    with the global prompt equals plain sampling."""
    from test_playground_sdxl import tiny_xl

    from sdstudio.playground.pipeline import generate as pg_generate
    from sdstudio.playground.recipe import Recipe, RegionItem

    c = tiny_xl(tiny_dir)
    base = dict(prompt="a park", steps=2, cfg=5.0, seed=3, width=64, height=64, sampler="euler")
    plain = np.asarray(pg_generate(c, Recipe(**base))[0], dtype=np.float32)
    full = np.asarray(pg_generate(c, Recipe(**base, region=[RegionItem("a park", box=(0, 0, 1, 1))]))[0],
                      dtype=np.float32)
    np.testing.assert_allclose(full, plain, atol=2)
    two = pg_generate(c, Recipe(**base, region=[RegionItem("a robot", box=(0, 0, 0.5, 1)),
                                                RegionItem("a dog", box=(0.5, 0, 1, 1))]))[0]
    assert two.size == (64, 64)


# -- Mix-of-Show's box format ------------------------------------------------------------------------------
# TencentARC/Mix-of-Show (commit 51270fd5f9907cada8f416a4eff191a74f842660) writes region boxes as
# [top, left, bottom, right] in pixels (regionally_sample.sh: region1='[12, 36, 1024, 600]'); its
# regionally_controlable_sampling.py divides by height/width and its attention processor keeps the feature
# cells ceil(start * size) .. floor(end * size).

def _mixofshow_cells(box, height, width, fh, fw):
    top, left, bottom, right = box
    t, l_, b, r = top / height, left / width, bottom / height, right / width
    m = torch.zeros(fh, fw, dtype=torch.bool)
    m[int(np.ceil(t * fh)):int(np.floor(b * fh)), int(np.ceil(l_ * fw)):int(np.floor(r * fw))] = True
    return m


@pytest.mark.parametrize("box", [[12, 36, 1024, 600], [18, 696, 1024, 1180], [0, 0, 512, 1536], []])
def test_mixofshow_pixel_boxes_cover_the_cells_mixofshow_covers(box):
    from sdstudio.playground.recipe import Recipe
    from sdstudio.playground.regions import regions_from_items

    text = f'width = 1536\nheight = 1024\n[[region]]\nprompt = "x"\nbox = {box}\nbox_format = "mixofshow"\n'
    recipe = Recipe.from_toml(text)
    (region,) = regions_from_items(recipe.region, recipe.width, recipe.height)
    for fh, fw in ((128, 192), (64, 96), (32, 48), (16, 24)):  # the UNet levels of a 1024x1536 image
        want = _mixofshow_cells(box or [0, 0, 1024, 1536], 1024, 1536, fh, fw)
        assert torch.equal(region.mask(fh, fw), want), (box, fh)
    # Kept as written (not transposed into fractions), so the file round-trips as the user wrote it.
    again = Recipe.from_toml(recipe.to_toml())
    assert again.region[0].box == tuple(float(v) for v in box) and again.region[0].box_format == "mixofshow"


def test_mixofshow_box_prefix_and_errors():
    from sdstudio.playground.recipe import Recipe

    r = Recipe.from_toml('width = 512\nheight = 256\n[[region]]\nprompt = "x"\nbox = "mixofshow: [0, 128, 256, 512]"\n')
    assert r.region[0].box == (0.0, 128.0, 256.0, 512.0) and r.region[0].box_format == "mixofshow"
    assert r.region[0].fractions(512, 256) == (0.25, 0.0, 1.0, 1.0)  # (left, top, right, bottom)
    cases = [('box = [0, 0, 300, 512]\nbox_format = "mixofshow"', "not inside the 512x256 image"),
             ('box = "mixofshow: [0, 0, 1, 1]"\nbox_format = "fractions"', "keep one of them"),
             ('box = [12, 36, 256, 300]', "box_format = \"mixofshow\""),  # pixels given as fractions: a hint
             ('box = [0, 0, 1, 1]\nbox_format = "pixels"', "box_format = 'pixels' is not known"),
             ('box = "mixofshow: __import__(\'os\')"', "four numbers")]
    for body, msg in cases:
        with pytest.raises(UserError, match=msg.replace("(", r"\(").replace("[", r"\[")):
            Recipe.from_toml(f'width = 512\nheight = 256\n[[region]]\nprompt = "x"\n{body}\n')


def test_mixofshow_box_draws_the_same_image_as_its_fractions(tiny_components):
    from sdstudio.playground.pipeline import generate as pg_generate
    from sdstudio.playground.recipe import Recipe, RegionItem

    base = dict(prompt="a park", steps=2, cfg=5.0, seed=3, width=64, height=128, sampler="euler")
    frac = pg_generate(tiny_components, Recipe(**base, region=[RegionItem("a robot", box=(0.25, 0, 1, 0.5))]))[0]
    pix = pg_generate(tiny_components, Recipe(**base, region=[RegionItem("a robot", box=(0, 16, 64, 64),
                                                                         box_format="mixofshow")]))[0]
    np.testing.assert_array_equal(np.asarray(frac), np.asarray(pix))
