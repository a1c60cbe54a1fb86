"""Concept outputs in the Playground (its own pipeline and stack): regions, EDLoRA files as LoRA items,
pivotal bundles and TI embeddings reproduce what training produced."""
from __future__ import annotations

import numpy as np
from concepts_util import fake_batch, train_steps

from sdstudio.models.loading import load_base
from sdstudio.playground.pipeline import generate
from sdstudio.playground.recipe import EmbeddingItem, LoraItem, Recipe, RegionItem
from sdstudio.playground.stack import Stack
from sdstudio.train.config import resolve


def _np(img):
    return np.asarray(img, dtype=np.float32) / 255.0


def _recipe(prompt, **kw):
    return Recipe(prompt=prompt, negative_prompt="ugly", steps=3, cfg=5.0, seed=9, width=64, height=64,
                  sampler="euler", **kw)


def test_recipe_regions_through_the_playground_pipeline(tiny_components):
    c = tiny_components
    plain = _np(generate(c, _recipe("a park"))[0])
    two = _np(generate(c, _recipe("a park", region=[RegionItem("a red robot", box=(0, 0, 0.5, 1)),
                                                   RegionItem("a blue dog", "", (0.5, 0, 1, 1), t2i_weight=0.5)]))[0])
    assert two.shape == (64, 64, 3) and np.abs(two - plain).max() > 0
    full = _np(generate(c, _recipe("a park", region=[RegionItem("a park", box=(0, 0, 1, 1))]))[0])
    np.testing.assert_allclose(full, plain, atol=2 / 255)  # 8-bit images; the float paths agree to ~1e-6
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in c.unet.attn_processors.values())


def test_edlora_file_as_a_lora_item_reproduces_training(tmp_path):
    from sdstudio.methods.edlora import EDLoRA

    c = load_base("tiny")
    m = EDLoRA()
    cfg = resolve({"method": "edlora", "seed": 4, "output_name": "zoe",
                   "edlora": dict(concept_tokens="<zoe1> <zoe2>", embedding_lr=5e-2, unet_lr=2e-2,
                                  text_encoder_lr=1e-2)})
    train_steps(m, c, cfg, steps=3, batch=fake_batch(captions=["a photo of <zoe1> <zoe2>"] * 2))
    path = m.save(c, tmp_path)[0]
    recipe = _recipe("a photo of <zoe1> <zoe2> in a garden")
    trained = _np(generate(c, recipe)[0])  # the training-time modules, through the Playground's pipeline
    fresh = load_base("tiny")
    stack = Stack(fresh)
    recipe.lora = [LoraItem(path=str(path), weight=1.0)]
    stack.apply(recipe)
    loaded = _np(generate(fresh, recipe, stack=stack)[0])
    np.testing.assert_allclose(loaded, trained, atol=2 / 255)
    # Without its tokens the prompt reads differently: the tokens really reach the layers.
    other = _np(generate(fresh, _recipe("a photo of a person in a garden", lora=recipe.lora), stack=stack)[0])
    assert np.abs(other - loaded).max() > 2 / 255


def test_pivotal_bundle_and_ti_embedding_load_in_the_playground(tmp_path):
    from sdstudio.methods.pivotal import Pivotal
    from sdstudio.methods.textual_inversion import TextualInversion

    c = load_base("tiny")
    m = Pivotal()
    cfg = resolve({"method": "pivotal", "seed": 2, "max_steps": 2, "learning_rate": 5e-2, "output_name": "piv",
                   "pivotal": dict(token="<piv-dog>", num_vectors=2, order="joint", rank=4, alpha=4.0,
                                   embedding_lr=5e-2)})
    train_steps(m, c, cfg, steps=2, batch=fake_batch(captions=["a photo of <piv-dog>"] * 2))
    lora_file = m.save(c, tmp_path)[0]
    trained = _np(generate(c, _recipe("a photo of <piv-dog> <piv-dog>_1"))[0])
    fresh = load_base("tiny")
    stack = Stack(fresh)
    recipe = _recipe("a photo of <piv-dog>", lora=[LoraItem(path=str(lora_file))])
    stack.apply(recipe)
    np.testing.assert_allclose(_np(generate(fresh, recipe, stack=stack)[0]), trained, atol=3 / 255)  # fp16 file

    c2 = load_base("tiny")
    ti = TextualInversion()
    tcfg = resolve({"method": "textual_inversion", "seed": 3, "learning_rate": 5e-2, "output_name": "emb",
                    "textual_inversion": dict(token="<ti-cup>", num_vectors=3, save_format="both")})
    train_steps(ti, c2, tcfg, steps=2)
    trained = _np(generate(c2, _recipe("a <ti-cup> <ti-cup>_1 <ti-cup>_2 on a table"))[0])
    (tmp_path / "ti").mkdir()
    files = ti.save(c2, tmp_path / "ti")
    assert len(files) == 2  # A1111 emb_params and diffusers learned_embeds
    for f in files:
        fresh = load_base("tiny")
        stack = Stack(fresh)
        recipe = _recipe("a <ti-cup> on a table", embedding=[EmbeddingItem(path=str(f), token="<ti-cup>")])
        stack.apply(recipe)
        np.testing.assert_allclose(_np(generate(fresh, recipe, stack=stack)[0]), trained, atol=2 / 255)
