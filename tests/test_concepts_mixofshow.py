"""EDLoRA follows Mix-of-Show's shipped defaults, and its files move to and from Mix-of-Show.

Reference: TencentARC/Mix-of-Show at commit 51270fd5f9907cada8f416a4eff191a74f842660: options/train/EDLoRA/*.yml
(rank 4, alpha 1, where: Attention / CLIPAttention, weight_decay 0.01, attn_reg_weight 0.01, no grad clipping
in train_edlora.py), mixofshow/pipelines/trainer_edlora.py (init_new_concept, cal_attn_reg, delta_state_dict) and
mixofshow/utils/convert_edlora_to_diffusers.py (how a .pth is loaded: W + alpha * up @ down).
"""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from concepts_util import fake_batch, train_steps

from sdstudio.errors import UserError
from sdstudio.models.loading import load_base
from sdstudio.train.config import resolve

MIXOFSHOW_COMMIT = "51270fd5f9907cada8f416a4eff191a74f842660"


def ed_cfg(tokens="<ann1> <ann2>", top=None, **kw):
    table = dict(concept_tokens=tokens, class_word="person", embedding_lr=3e-2, unet_lr=1e-2, text_encoder_lr=1e-3,
                 **kw)
    return resolve({"method": "edlora", "seed": 1, "output_name": "ann", **(top or {}), "edlora": table})


# -- 1. LoRA targets -------------------------------------------------------------------------------------

def test_unet_lora_on_attention_qkvo_only_128_modules():
    """Mix-of-Show's `where: Attention` puts LoRA on every Linear of every diffusers Attention module: q, k, v and
    out of attn1 and attn2 in the 16 transformer blocks of SD1.5 = 128 (the tiny model has SD1.5's blocks)."""
    from sdstudio.methods.edlora import EDLoRA

    c = load_base("tiny")
    m = EDLoRA()
    m.prepare(c, ed_cfg())
    names = list(m.unet_lora)
    assert len(names) == 128
    assert all(n.endswith(("_to_q", "_to_k", "_to_v", "_to_out_0")) for n in names)
    assert sum("_attn1_" in n for n in names) == sum("_attn2_" in n for n in names) == 64
    assert len(m.te_lora) == 8  # `where: CLIPAttention`: q/k/v/out of the 2 tiny text-encoder layers
    m2 = EDLoRA()
    m2.prepare(load_base("tiny"), ed_cfg(unet_targets="transformer"))  # the wider choice stays available
    assert len(m2.unet_lora) == 192


# -- 3. optimizer: no clipping, weight decay 0.01 on the embeddings ----------------------------------------

def test_no_gradient_clipping_and_embedding_weight_decay():
    from sdstudio.methods.edlora import EDLoRA
    from sdstudio.train.optim import build_optimizer

    cfg = ed_cfg()
    assert cfg.max_grad_norm == 0.0  # EDLoRA's own default: Mix-of-Show never clips
    assert ed_cfg(top={"max_grad_norm": 1.0}).max_grad_norm == 1.0  # a value the user gives wins
    assert resolve({"method": "lora"}).max_grad_norm == 1.0  # other methods keep the shared default
    c = load_base("tiny")
    groups = EDLoRA().prepare(c, cfg)
    opt = build_optimizer("adamw", groups, cfg, "cpu")
    decay = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decay == {"embeddings": 0.01, "text_encoder_lora": 0.01, "unet_lora": 0.01}


# -- 4. token initialisation -------------------------------------------------------------------------------

def test_first_token_is_one_random_vector_copied_to_every_layer():
    from sdstudio.methods.edlora import EDLoRA

    c = load_base("tiny")
    m = EDLoRA()
    m.prepare(c, ed_cfg())
    rows = m.rows().detach()
    first, second = rows[:16], rows[16:]
    assert torch.equal(first, first[:1].expand(16, -1)) and float(first[0].norm()) > 0
    assert 0.5 < float(first.std()) / 0.013 < 1.5  # N(0, 0.013), Mix-of-Show's '<rand-0.013>'
    ids = c.tokenizer("person", add_special_tokens=False).input_ids
    person = c.text_encoder.get_input_embeddings().base.weight[ids].float().mean(0)
    assert torch.allclose(second, person.expand(16, -1))


# -- 2. attention regularisation -------------------------------------------------------------------------

def _outside_mass(m, c, mask, caption: str) -> torch.Tensor:
    """Share of each concept word's cross-attention that falls outside the mask, averaged over heads, layers and
    the resolutions where the mask has background; one fixed noisy latent and timestep."""
    from sdstudio.methods.attention_reg import RecordContext, RecordingAttnProcessor, feature_grid
    from sdstudio.concepts.layerwise import install_processors

    rec = RecordContext()
    install_processors(c.unet, rec, RecordingAttnProcessor)
    rec.start(m.concept_positions(c, [caption]))
    with torch.no_grad():
        states = m.encode(c, [caption])
        lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(123))
        c.unet(lat, torch.tensor([500]), states)
    shares = []
    for mp in rec.take():
        fh, fw = feature_grid((8, 8), mp.shape[2])
        inside = F.interpolate(mask[:1], size=(fh, fw), mode="nearest").flatten() >= 0.5
        if bool(inside.all()):
            continue
        p = mp[0].float().mean(0)  # (HW, 2)
        shares.append(p[~inside].sum(0) / p.sum(0))
    return torch.stack(shares).mean(0)


def test_attention_regularisation_keeps_attention_inside_the_mask():
    """Two runs from the same start, at Mix-of-Show's default weight 0.01, on images whose subject mask covers
    a quarter of the picture: with the term, both concept words put less of their attention outside the mask."""
    from sdstudio.methods.edlora import EDLoRA

    caption = "a photo of <ann1> <ann2>"
    batch = fake_batch(mask=True, captions=[caption] * 2)
    result = {}
    for weight in (0.0, 0.01):
        c = load_base("tiny")
        m = EDLoRA()
        train_steps(m, c, ed_cfg(attn_reg_weight=weight), steps=30, batch=batch)
        result[weight] = _outside_mass(m, c, batch.mask, caption)
    print(f"\nATTENTION OUTSIDE THE MASK (word 1, word 2) after 30 steps: without the term "
          f"{result[0.0].tolist()}, with it (0.01) {result[0.01].tolist()}; uniform attention gives 0.75")
    assert bool((result[0.01] < result[0.0] - 0.02).all())


def test_attention_reg_term_matches_mix_of_show_and_needs_background():
    """The term itself, on hand-made maps: Mix-of-Show's cal_attn_reg (reg_full_identity false and true)."""
    from sdstudio.methods.attention_reg import attention_reg_loss

    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(2, 3, 16, 2, generator=g) for _ in range(2)] + [torch.rand(2, 3, 4, 2, generator=g)]
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, 1:3, 1:3] = 1
    got = attention_reg_loss(maps, mask, 0.01)
    got_full = attention_reg_loss(maps, mask, 0.01, full_identity=True)
    want, want_full = 0.0, 0.0
    for group, (fh, fw) in ((maps[:2], (4, 4)), (maps[2:], (2, 2))):  # Mix-of-Show's own steps, written out
        cross = torch.cat([x.view(2, 3, fh, fw, 2) for x in group], 1)
        cross = cross.sum(1) / cross.shape[1]
        adj, subj = cross[..., 0] / cross[..., 0].max(), cross[..., 1] / cross[..., 1].max()
        gt = F.interpolate(mask, size=(fh, fw), mode="nearest").squeeze(1)
        if not bool((gt == 0).any()):
            continue
        want += 0.01 * (subj[gt == 0].mean() + adj[gt == 0].mean())
        want_full += 0.01 * (F.mse_loss(subj, gt) + adj[gt == 0].mean())
    assert torch.allclose(got, torch.as_tensor(want)) and torch.allclose(got_full, torch.as_tensor(want_full))
    assert float(attention_reg_loss(maps, torch.ones(2, 1, 4, 4), 0.01)) == 0.0  # no background: nothing to do


def test_without_masks_the_term_is_off_and_the_step_unchanged():
    """No mask files means all-ones masks: no background, so the step is the plain one (fast attention kernel)."""
    from sdstudio.methods.edlora import EDLoRA

    batch = fake_batch(captions=["a photo of <ann1> <ann2>"] * 2)
    batch.mask = torch.ones(2, 1, 8, 8)
    losses = []
    for weight in (0.0, 0.01):
        c = load_base("tiny")
        m = EDLoRA()
        torch.manual_seed(0)
        m.prepare(c, ed_cfg(attn_reg_weight=weight))
        torch.manual_seed(1)
        losses.append(float(m.loss(c, batch, 0).detach()))
        assert m.rec is None or m.rec.take() == []  # nothing was recorded
    assert losses[0] == losses[1]


def test_attention_reg_with_gradient_checkpointing():
    """The recording processor runs the same computation when checkpointing recomputes the forward."""
    from sdstudio.methods.edlora import EDLoRA

    c = load_base("tiny")
    c.unet.enable_gradient_checkpointing()
    c.unet.train()
    m = EDLoRA()
    m.prepare(c, ed_cfg())
    loss = m.loss(c, fake_batch(mask=True, captions=["a photo of <ann1> <ann2>"] * 2), 0)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in m.unet_lora.parameters())


# -- 7. Mix-of-Show .pth exchange --------------------------------------------------------------------------

def _trained(tmp_path, alpha=1.0):
    from sdstudio.methods.edlora import EDLoRA

    c = load_base("tiny")
    m = EDLoRA()
    train_steps(m, c, ed_cfg(lora_alpha=alpha), steps=2, batch=fake_batch(captions=["a photo of <ann1> <ann2>"] * 2))
    return m.save(c, tmp_path)[0]


def _mixofshow_merge(model, lora: dict, alpha: float, text: bool) -> dict:
    """What Mix-of-Show's convert_edlora does: W + alpha * up @ down for every key it finds. Its text-encoder
    names carry transformers 4's `text_model.` level, which transformers 5 drops."""
    sd = {}
    for key, down in lora.items():
        if not key.endswith(".lora_down.weight"):
            continue
        path = key[:-len(".lora_down.weight")]
        up = lora[f"{path}.lora_up.weight"]
        if text:
            assert path.startswith("text_model.")
            path = path[len("text_model."):]
        w = model.get_submodule(path).weight
        sd[path] = w + alpha * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    return sd


@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_export_to_mixofshow_loads_as_our_file(tmp_path, alpha):
    """Our file -> .pth: Mix-of-Show's own merge (at the alpha the user exports for) gives the weights our file
    gives, the layout is `{'params': {new_concept_embedding, text_encoder, unet}}` with Mix-of-Show's names, and
    the .pth imports back to the same weights."""
    from sdstudio.formats.mixofshow import export_mixofshow, import_mixofshow
    from sdstudio.formats.edlora import read_edlora

    ours = _trained(tmp_path, alpha=0.5)
    pth = export_mixofshow(ours, tmp_path / "edlora_model-latest.pth", alpha=alpha)
    params = torch.load(pth, weights_only=True)["params"]
    assert set(params) == {"new_concept_embedding", "text_encoder", "unet"}
    assert set(params["new_concept_embedding"]) == {"<ann1>", "<ann2>"}
    assert params["new_concept_embedding"]["<ann1>"].shape == (16, 32)
    assert "text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight" in params["text_encoder"]
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_up.weight" in params["unet"]
    assert len(params["unet"]) == 2 * 128 and len(params["text_encoder"]) == 2 * 8

    f = read_edlora(ours)
    c = load_base("tiny")
    for model, kind, part in ((c.text_encoder, "te", "text_encoder"), (c.unet, "unet", "unet")):
        mine = f.deltas(model, kind)
        theirs = _mixofshow_merge(model, params[part], alpha, part == "text_encoder")
        assert set(mine) == set(theirs)
        for path, delta in mine.items():
            torch.testing.assert_close(theirs[path] - model.get_submodule(path).weight, delta, atol=1e-6, rtol=1e-5)

    back = read_edlora(import_mixofshow(pth, tmp_path / "back.safetensors", alpha=alpha))
    assert torch.equal(back.embeddings["<ann1>"], f.embeddings["<ann1>"])
    for model, kind in ((c.text_encoder, "te"), (c.unet, "unet")):
        a, b = f.deltas(model, kind), back.deltas(model, kind)
        for path in a:
            torch.testing.assert_close(b[path], a[path], atol=1e-6, rtol=1e-5)


def test_import_a_file_as_mixofshow_writes_it(tmp_path):
    """A .pth built the way Mix-of-Show's EDLoRATrainer.delta_state_dict() lays it out (LoRALinearLayer names,
    fp32, no alpha) loads in our Playground as Mix-of-Show's convert_edlora would load it at alpha 0.6."""
    from sdstudio.formats.mixofshow import import_mixofshow
    from sdstudio.formats.edlora import read_edlora
    from sdstudio.methods.edlora import apply_edlora

    c = load_base("tiny")
    g = torch.Generator().manual_seed(3)
    params = {"new_concept_embedding": {"<cat1>": torch.randn(16, 32, generator=g) * 0.1,
                                        "<cat2>": torch.randn(16, 32, generator=g) * 0.1},
              "text_encoder": {}, "unet": {}}
    for name, mod in c.text_encoder.named_modules():
        if name.endswith("self_attn"):
            for child in ("q_proj", "k_proj", "v_proj", "out_proj"):
                lin = mod.get_submodule(child)
                params["text_encoder"][f"text_model.{name}.{child}.lora_down.weight"] = torch.randn(4, lin.in_features, generator=g)
                params["text_encoder"][f"text_model.{name}.{child}.lora_up.weight"] = torch.randn(lin.out_features, 4, generator=g) * 0.01
    for name, mod in c.unet.named_modules():
        if type(mod).__name__ == "Attention":
            for child in ("to_q", "to_k", "to_v", "to_out.0"):
                lin = mod.get_submodule(child)
                params["unet"][f"{name}.{child}.lora_down.weight"] = torch.randn(4, lin.in_features, generator=g)
                params["unet"][f"{name}.{child}.lora_up.weight"] = torch.randn(lin.out_features, 4, generator=g) * 0.01
    pth = tmp_path / "edlora_model-1000.pth"
    torch.save({"params": params}, pth)

    f = read_edlora(import_mixofshow(pth, tmp_path / "cat.safetensors", alpha=0.6, base_model="tiny"))
    assert f.tokens == ["<cat1>", "<cat2>"] and f.layers == 16 and f.meta["sdstudio.base_model"] == "tiny"
    for model, kind, part in ((c.text_encoder, "te", "text_encoder"), (c.unet, "unet", "unet")):
        theirs = _mixofshow_merge(model, params[part], 0.6, part == "text_encoder")
        mine = f.deltas(model, kind)
        assert len(mine) == len(theirs) == {"te": 8, "unet": 128}[kind]
        for path, w in theirs.items():
            torch.testing.assert_close(mine[path], w - model.get_submodule(path).weight, atol=1e-6, rtol=1e-5)
    applied = apply_edlora(c, f)  # and it goes live like any EDLoRA file
    assert len(applied.layers) == 136  # one adapter layer per LoRA module


class _NotATensor:
    pass


def test_import_refuses_what_is_not_a_plain_edlora_pth(tmp_path):
    from sdstudio.formats.mixofshow import import_mixofshow

    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as fh:
        pickle.dump({"params": _NotATensor()}, fh)
    with pytest.raises(UserError, match="loaded safely"):
        import_mixofshow(evil, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    plain = tmp_path / "lora_model-1.pth"  # Mix-of-Show's enable_edlora = false: one row per token
    torch.save({"params": {"new_concept_embedding": {"<c1>": torch.zeros(1, 32)}, "text_encoder": {}, "unet": {}}},
               plain)
    with pytest.raises(UserError, match="only EDLoRA files convert"):
        import_mixofshow(plain, tmp_path / "x.safetensors")
    full = tmp_path / "full.pth"
    torch.save({"params": {"new_concept_embedding": {"<c1>": torch.zeros(16, 32)}, "text_encoder": {},
                           "unet": {"down_blocks.0.attentions.0.proj_in.weight": torch.zeros(4, 4)}}}, full)
    with pytest.raises(UserError, match="not a LoRA tensor"):
        import_mixofshow(full, tmp_path / "x.safetensors")


def test_mixofshow_cli_import_and_export(tmp_path):
    import os
    import subprocess
    import sys

    from sdstudio.formats.mixofshow import export_mixofshow

    pth = export_mixofshow(_trained(tmp_path), tmp_path / "edlora_model-latest.pth")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "sdstudio", "--home", str(tmp_path / "ws"), "mixofshow-import", str(pth),
                        "--base-model", "tiny"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "ws" / "models" / "edlora" / "edlora_model-latest.safetensors"
    assert out.is_file()
    from sdstudio.formats.kinds import detect_kind

    assert detect_kind(out) == "edlora"
    r = subprocess.run([sys.executable, "-m", "sdstudio", "mixofshow-export", str(out), "--out", str(tmp_path / "again.pth")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert torch.load(tmp_path / "again.pth", weights_only=True)["params"]["new_concept_embedding"]["<ann1>"].shape == (16, 32)
    r = subprocess.run([sys.executable, "-m", "sdstudio", "mixofshow-import", str(out)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
