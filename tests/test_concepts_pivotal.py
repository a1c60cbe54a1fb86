"""Pivotal tuning on the tiny model: all three orders train what they should when they should; the bundled
LoRA file reproduces the trained output in diffusers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from concepts_util import fake_batch, sample_np

from sdstudio.models.loading import load_base
from sdstudio.train.config import resolve


def piv_cfg(order: str):
    return resolve({"method": "pivotal", "seed": 2, "max_steps": 4, "learning_rate": 5e-2, "output_name": "piv",
                    "pivotal": dict(token="<piv-cat>", num_vectors=2, init_word="cat", order=order,
                                    first_phase=0.5, rank=4, alpha=4.0, embedding_lr=5e-2)})


def _snap(m, c):
    return m.ti.rows().detach().clone(), torch.cat([p.detach().flatten() for p in m.lora_params]).clone()


@pytest.mark.parametrize("order,phases", [("ti_then_lora", ["ti", "ti", "lora", "lora"]),
                                          ("lora_then_ti", ["lora", "lora", "ti", "ti"]),
                                          ("joint", ["both"] * 4)])
def test_pivotal_orders(order, phases, tmp_path):
    from sdstudio.formats.embeddings import bundled_embeddings
    from sdstudio.methods.pivotal import Pivotal

    c = load_base("tiny")
    m = Pivotal()
    cfg = piv_cfg(order)
    groups = m.prepare(c, cfg)
    assert {g.name: g.lr for g in groups} == {"embedding": 5e-2, "unet": 5e-2}
    opt = torch.optim.AdamW([{"params": g.params, "lr": g.lr, "weight_decay": 1e-2} for g in groups])
    for step, phase in enumerate(phases):
        emb0, lora0 = _snap(m, c)
        loss = m.loss(c, fake_batch(seed=step, captions=["a photo of <piv-cat>"] * 2), step)
        assert m.phase == phase
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        emb1, lora1 = _snap(m, c)
        assert torch.equal(emb0, emb1) == (phase == "lora"), (step, phase)
        assert torch.equal(lora0, lora1) == (phase == "ti"), (step, phase)

    if order != "joint":
        return
    files = m.save(c, tmp_path)
    # A1111's bundle, the LoRA alone, the word alone (methods/pivotal.py says who loads which).
    assert [f.name for f in files] == ["piv.safetensors", "piv.lora-only.safetensors", "piv.embedding.safetensors"]
    from sdstudio.formats.kinds import detect_kind
    from sdstudio.formats.safe_io import load_state_dict

    assert [detect_kind(f) for f in files] == ["lora", "lora", "embedding"]
    bundle = bundled_embeddings(load_state_dict(files[0]))
    assert list(bundle) == ["<piv-cat>"] and torch.allclose(bundle["<piv-cat>"], m.ti.rows().detach())
    plain = load_state_dict(files[1])
    from sdstudio.formats.safe_io import read_safetensors_metadata

    assert read_safetensors_metadata(files[1])["ss_output_name"] == "piv.lora-only"  # A1111's alias: its own
    assert set(plain) == {k for k in load_state_dict(files[0]) if not k.startswith("bundle_emb.")}
    # In plain diffusers, as its users load files, with no filtering: the LoRA-only file plus the separate
    # embedding give the trained picture; the A1111 bundle is what diffusers refuses.
    trained = sample_np(c.pipeline(), "a photo of <piv-cat>")
    pipe = load_base("tiny").pipeline()
    pipe.load_lora_weights(str(tmp_path), weight_name=files[1].name)
    pipe.load_textual_inversion(str(files[2]), token="<piv-cat>")
    np.testing.assert_allclose(sample_np(pipe, "a photo of <piv-cat>"), trained, atol=2e-3)  # fp16 LoRA file
    with pytest.raises(ValueError):
        load_base("tiny").pipeline().load_lora_weights(str(tmp_path), weight_name=files[0].name)


def test_pivotal_resume_with_more_steps_keeps_the_phase_split(tmp_path):
    """Raising max_steps on resume (Train again with more steps) continues in the second phase: the split
    step comes from the checkpoint, not from the new max_steps."""
    from sdstudio.methods.pivotal import Pivotal

    cfg = resolve({**piv_cfg("ti_then_lora").to_dict(), "max_steps": 4})
    cfg.options.first_phase = 0.75  # split at step 3 of 4
    c = load_base("tiny")
    m = Pivotal()
    m.prepare(c, cfg)
    assert m.split == 3 and m.phase_at(3) == "lora"
    sd = m.trainable_state_dict(c)

    more = resolve({**cfg.to_dict(), "max_steps": 8})  # 0.75 * 8 = 6 would put steps 4 and 5 back into TI
    c2, m2 = load_base("tiny"), Pivotal()
    m2.prepare(c2, more)
    assert m2.phase_at(4) == "ti"  # what the new setting alone would say
    m2.load_trainable_state_dict(c2, sd)
    assert [m2.phase_at(s) for s in range(2, 8)] == ["ti", "lora", "lora", "lora", "lora", "lora"]
