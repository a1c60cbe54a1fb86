"""Textual Inversion on the tiny model: only the new rows train, both file formats reproduce the trained output."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from concepts_util import sample_np, train_steps

from sdstudio.errors import UserError
from sdstudio.models.loading import load_base
from sdstudio.train.config import resolve


def ti_cfg(**kw):
    table = dict(token="<cat-toy>", num_vectors=2, init_word="toy", save_format="both", **kw)
    return resolve({"method": "textual_inversion", "learning_rate": 5e-2, "seed": 3, "output_name": "cat-toy",
                    "textual_inversion": table})


def test_ti_trains_only_new_rows_and_both_formats_reproduce(tmp_path):
    from sdstudio.methods.textual_inversion import TextualInversion

    c = load_base("tiny")
    before = c.text_encoder.get_input_embeddings().weight.detach().clone()
    unet_before = {k: v.clone() for k, v in c.unet.state_dict().items()}
    m = TextualInversion()
    cfg = ti_cfg(norm_decay=0.1)
    groups, losses = train_steps(m, c, cfg, steps=3)
    assert [p.shape for g in groups for p in g.params] == [torch.Size([2, 32])]
    after = c.text_encoder.get_input_embeddings().weight.detach()
    assert after.shape[0] == before.shape[0] + 2
    # Every original row is bit-identical; the new rows moved away from the init word.
    assert torch.equal(after[: before.shape[0]], before)
    toy = before[c.tokenizer("toy", add_special_tokens=False).input_ids].mean(0)
    assert not torch.allclose(after[-1], toy)
    assert all(torch.equal(v, c.unet.state_dict()[k]) for k, v in unet_before.items())

    files = m.save(c, tmp_path)
    assert sorted(f.name for f in files) == ["cat-toy.learned_embeds.safetensors", "cat-toy.safetensors"]
    trained = sample_np(c.pipeline(), "a photo of <cat-toy>")
    base_img = sample_np(load_base("tiny").pipeline(), "a photo of a toy")
    assert np.abs(trained - base_img).max() > 1e-4  # the token changes the picture

    for f in files:  # both formats load with diffusers' own loader and give the same image
        fresh = load_base("tiny").pipeline()
        fresh.load_textual_inversion(str(f), token="<cat-toy>")
        np.testing.assert_allclose(sample_np(fresh, "a photo of <cat-toy>"), trained, atol=1e-5)


def test_ti_refuses_known_token_and_random_init():
    from sdstudio.methods.textual_inversion import TextualInversion

    c = load_base("tiny")
    bad = ti_cfg()
    bad.options.token = "dog"
    with pytest.raises(UserError, match="already in the tokenizer's vocabulary"):
        TextualInversion().prepare(c, bad)
    cfg = ti_cfg(init_std=0.5)
    cfg.options.init_word = ""
    m = TextualInversion()
    m.prepare(c, cfg)
    std = float(m.rows().detach().std())
    assert 0.3 < std < 0.7


def test_ti_clip_skip_changes_conditioning():
    from sdstudio.methods.textual_inversion import TextualInversion

    c = load_base("tiny")
    m = TextualInversion()
    cfg = ti_cfg(clip_skip=2)
    m.prepare(c, cfg)
    a = m.encode(c, ["a photo of <cat-toy>"])
    m.o.clip_skip = 1
    b = m.encode(c, ["a photo of <cat-toy>"])
    assert a.shape == b.shape and not torch.allclose(a, b)


@pytest.mark.parametrize("method,sets,bad", [
    ("textual_inversion", ["textual_inversion.token=cat"], "'cat'"),
    ("pivotal", ["pivotal.token=dog", "pivotal.num_vectors=1"], "'dog'"),
    ("edlora", ["edlora.concept_tokens=<anna1> photo"], "'photo'"),
    ("textual_inversion", ["textual_inversion.token=<my cat>"], "no spaces"),
])
def test_known_word_as_token_is_refused_before_any_model_loads(tmp_path, monkeypatch, method, sets, bad):
    """The preflight checks new words against CLIP's vocabulary (offline): seconds, not a base-model load."""
    from train_helpers import fast_sets, make_images

    from sdstudio.models import loading
    from sdstudio.train.config import load_config
    from sdstudio.train.loop import preflight

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the token was checked")

    monkeypatch.setattr(loading, "load_base", no_load)
    ds = make_images(tmp_path / "ds", 2)
    cfg = load_config(None, fast_sets(ds, tmp_path / "out", method=method) + sets)
    with pytest.raises(UserError, match=bad):
        preflight(cfg)
    ok = load_config(None, fast_sets(ds, tmp_path / "out2", method=method))  # the method's default words pass
    preflight(ok)
