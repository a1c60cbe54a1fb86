"""EDLoRA on the tiny model: layer-wise tokens reach their own cross-attention layer; the file reproduces."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from concepts_util import train_steps

from sdstudio.errors import UserError
from sdstudio.models.loading import load_base
from sdstudio.train.config import resolve


def ed_cfg(tokens="<anna1> <anna2>", **kw):
    table = dict(concept_tokens=tokens, class_word="woman", embedding_lr=3e-2, unet_lr=1e-2, text_encoder_lr=1e-3,
                 **kw)
    return resolve({"method": "edlora", "seed": 1, "output_name": "anna", "edlora": table})


def test_edlora_layerwise_embeddings_and_file_reproduces(tmp_path):
    from sdstudio.concepts.layerwise import cross_attention_layers, encode_layerwise
    from sdstudio.methods.edlora import EDLoRA, apply_edlora
    from sdstudio.concepts.regions import generate

    c = load_base("tiny")
    m = EDLoRA()
    groups, _ = train_steps(m, c, ed_cfg(), steps=3)
    assert {g.name: g.lr for g in groups} == {"embeddings": 3e-2, "text_encoder_lora": 1e-3, "unet_lora": 1e-2}
    layers = cross_attention_layers(c.unet)
    assert len(layers) == 16 and m.rows().shape == (32, 32)
    # TE attention linears (2 layers x 4) and the UNet's attention q/k/v/out carry LoRA (Mix-of-Show's targets;
    # tests/test_concepts_mixofshow.py counts them).
    assert len(m.te_lora) == 8
    assert any("attn2_to_k" in k for k in m.unet_lora) and not any(k.endswith("proj_in") for k in m.unet_lora)

    # A hook on each cross-attention layer's to_k sees what that layer attends to.
    seen = {}
    hooks = [c.unet.get_submodule(n).to_k.register_forward_pre_hook(
        lambda mod, args, n=n: seen.__setitem__(n, args[0].detach().clone())) for n in layers]
    prompt = "a photo of <anna1> <anna2>"
    states = encode_layerwise(c, [prompt], m.table, 16)
    with torch.no_grad():
        c.unet(torch.randn(1, 4, 8, 8), 500, states)
    for h in hooks:
        h.remove()
    pos = c.tokenizer(m.prompt(prompt).replace("<anna1>", "<anna1>#00").replace("<anna2>", "<anna2>#00")).input_ids
    tok_pos = pos.index(c.tokenizer.convert_tokens_to_ids("<anna1>#00"))
    fed = torch.stack([seen[n][0, tok_pos] for n in layers])
    for i, n in enumerate(layers):  # layer i gets exactly slice i ...
        assert torch.equal(seen[n], states[:, i])
    for i in range(16):  # ... and every layer's concept embedding differs from every other's
        for j in range(i + 1, 16):
            assert not torch.allclose(fed[i], fed[j], atol=1e-7), (i, j)

    files = m.save(c, tmp_path)
    assert files[0].name == "anna.safetensors"
    kw = dict(steps=3, guidance=4.0, seed=5, height=64, width=64, output_type="np")
    trained = generate(c, prompt, **kw)
    fresh = load_base("tiny")
    applied = apply_edlora(fresh, files[0])
    np.testing.assert_allclose(generate(fresh, prompt, **kw), trained, atol=1e-5)
    applied.set_weight(0.0)  # weight 0: LoRA off, tokens still there -> a different picture
    assert np.abs(generate(fresh, prompt, **kw) - trained).max() > 1e-4
    with pytest.raises(UserError, match="overlap"):
        other = m.state_dict_to_save(c)
        from sdstudio.formats.edlora import EDLoRAFile
        apply_edlora(fresh, EDLoRAFile(tmp_path / "x.safetensors",
                                       {"<anna1>": other[0]["new_concept_embedding.<anna1>"],
                                        "<zed2>": other[0]["new_concept_embedding.<anna2>"]}, {}, {}))


def test_edlora_norm_threshold_stops_embeddings_and_bad_input():
    from sdstudio.formats.edlora import EDLoRAFile
    from sdstudio.methods.edlora import EDLoRA, apply_edlora

    c = load_base("tiny")
    m = EDLoRA()
    m.prepare(c, ed_cfg(emb_norm_threshold=0.01))  # below the start norm: stops at the first step
    rows0 = m.rows().detach().clone()
    import concepts_util

    opt = torch.optim.AdamW([m.emb.new], lr=0.1)
    loss = m.loss(c, concepts_util.fake_batch(), 0)
    loss.backward()
    assert m.stopped_at == 0 and m.emb.new.grad is None
    opt.step()
    assert torch.equal(m.rows().detach(), rows0)

    with pytest.raises(UserError, match="already in the tokenizer's vocabulary"):
        EDLoRA().prepare(load_base("tiny"), ed_cfg(tokens="dog <x2>"))
    with pytest.raises(UserError, match="two different new words"):
        EDLoRA().prepare(load_base("tiny"), ed_cfg(tokens="<a1>"))
    wrong = EDLoRAFile(__import__("pathlib").Path("sd15.safetensors"), {"<b1>": torch.zeros(16, 768),
                       "<b2>": torch.zeros(16, 768)}, {}, {"sdstudio.base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5"})
    with pytest.raises(UserError, match="another base model"):
        apply_edlora(load_base("tiny"), wrong)


def test_edlora_masked_loss_uses_mask():
    from concepts_util import fake_batch

    from sdstudio.methods.edlora import EDLoRA

    c = load_base("tiny")
    m = EDLoRA()
    m.prepare(c, ed_cfg(masked_loss=True))
    b = fake_batch(mask=True)
    torch.manual_seed(0)
    masked = float(m.loss(c, b, 0))
    b.mask = None
    torch.manual_seed(0)
    full = float(m.loss(c, b, 0))
    assert masked != full


def test_edlora_keeps_its_processors_when_attention_is_swapped():
    """The loop enables xformers after prepare (which replaces every processor): the next loss puts the
    layer-wise processors back, wrapping whatever attention kernel the layer now has."""
    from diffusers.models.attention_processor import AttnProcessor
    from concepts_util import fake_batch

    from sdstudio.concepts.layerwise import LayerwiseAttnProcessor
    from sdstudio.methods.edlora import EDLoRA

    c = load_base("tiny")
    m = EDLoRA()
    m.prepare(c, ed_cfg())
    c.unet.set_attn_processor(AttnProcessor())  # what enable_xformers_memory_efficient_attention does, kernel aside
    loss = m.loss(c, fake_batch(n=1), 0)
    assert torch.isfinite(loss)
    proc = c.unet.get_submodule(m.cross[5]).processor
    assert isinstance(proc, LayerwiseAttnProcessor) and proc.index == 5 and isinstance(proc.inner, AttnProcessor)
