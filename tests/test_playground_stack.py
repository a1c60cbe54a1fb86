"""The Playground's adapter stack on the tiny model: weights, enable, block weights, step ranges, fusing,
LoHa/LoKr, embeddings, file-read counting. Every LoRA here is built by the test itself (random kohya/LyCORIS
dicts on the tiny model's real module names), since the engine's writer is another issue's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdstudio.errors import UserError
from sdstudio.formats.kinds import kohya_names_for
from sdstudio.formats.safe_io import save_safetensors
from sdstudio.playground import files as files_mod
from sdstudio.playground import stack as stack_mod
from sdstudio.playground.recipe import EmbeddingItem, LoraItem, Recipe
from sdstudio.playground.session import Playground

BASE = Recipe(prompt="a photo of a dog", steps=3, width=64, height=64, sampler="euler", cfg=5.0, seed=11)


def kohya_lora(comps, seed: int, rank=4, alpha=2.0, scale=0.15, only=None, ranks=None) -> dict:
    """A kohya LoRA/LoCon over every Linear/Conv2d (or those whose path contains `only`).
    `ranks` maps a path substring to a (rank, alpha) override, for files with mixed ranks."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for model, kind in ((comps.unet, "unet"), (comps.text_encoder, "te")):
        for name, path in kohya_names_for(model, kind).items():
            if only and not any(o in path for o in only):
                continue
            mod = model.get_submodule(path)
            r, a = rank, alpha
            for key, (rr, aa) in (ranks or {}).items():
                if key in path:
                    r, a = rr, aa
            if isinstance(mod, torch.nn.Conv2d):
                sd[f"{name}.lora_down.weight"] = torch.randn(r, mod.in_channels, *mod.kernel_size, generator=g) * scale
                sd[f"{name}.lora_up.weight"] = torch.randn(mod.out_channels, r, 1, 1, generator=g) * scale
            else:
                sd[f"{name}.lora_down.weight"] = torch.randn(r, mod.in_features, generator=g) * scale
                sd[f"{name}.lora_up.weight"] = torch.randn(mod.out_features, r, generator=g) * scale
            sd[f"{name}.alpha"] = torch.tensor(float(a))
    return sd


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pg():
    """A session with its own tiny base (the stack mutates modules, so not the shared fixture)."""
    session = Playground(device="cpu")
    session.base("tiny")
    return session


@pytest.fixture(scope="module")
def files(pg, tiny_components, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    c = tiny_components  # unwrapped module names (the session's base gets adapter layers)
    out = {
        "a": save_safetensors(kohya_lora(c, 1), d / "a.safetensors"),
        "b": save_safetensors(kohya_lora(c, 2, rank=8, alpha=1.0), d / "b.safetensors"),
        "mixed": save_safetensors(kohya_lora(c, 3, rank=4, alpha=4.0, ranks={"resnets": (8, 2.0), "attn2": (2, 1.0)}),
                                  d / "mixed.safetensors"),
    }
    return out


def img(pg, recipe, fuse=False):
    return np.asarray(pg.run(recipe, fuse=fuse)[0]).astype(np.int16)


def with_loras(*items):
    return BASE.replace(lora=list(items))


def test_weights_one_zero_equal_first_alone_and_disabled_equal_base(pg, files):
    base = img(pg, BASE)
    a_alone = img(pg, with_loras(LoraItem(str(files["a"]), 1.0)))
    assert np.abs(a_alone - base).mean() > 1, "the LoRA must change the image for this test to mean anything"
    both = img(pg, with_loras(LoraItem(str(files["a"]), 1.0), LoraItem(str(files["b"]), 0.0)))
    assert np.array_equal(both, a_alone)
    b_on = img(pg, with_loras(LoraItem(str(files["a"]), 1.0), LoraItem(str(files["b"]), 1.0)))
    assert not np.array_equal(b_on, a_alone)
    off = img(pg, with_loras(LoraItem(str(files["a"]), 1.0, enabled=False), LoraItem(str(files["b"]), 1.0,
                                                                                        enabled=False)))
    assert np.array_equal(off, base)
    # The same holds on the fused path.
    assert np.array_equal(img(pg, with_loras(LoraItem(str(files["a"]), 1.0), LoraItem(str(files["b"]), 0.0)), True),
                          img(pg, with_loras(LoraItem(str(files["a"]), 1.0)), True))


def test_mixed_ranks_apply_alpha_per_module(pg, files):
    """Each module gets its own alpha/rank: W + alpha/r * up @ down, hand-computed here per module."""
    from sdstudio.formats.kinds import group_kohya

    sd = {k: v for k, v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(files["mixed"]).items()}
    groups = group_kohya(sd)
    pg.stack.apply(with_loras(LoraItem(str(files["mixed"]), 0.7)))
    unet = pg.comps.unet
    checked = set()
    for key in ("down_blocks.0.resnets.0.conv1", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"):
        kname = "lora_unet_" + key.replace(".", "_")
        g = groups[kname]
        r = g["lora_down.weight"].shape[0]
        scale = 0.7 * float(g["alpha"]) / r
        layer = unet.get_submodule(key)
        base_layer = layer.base_layer
        w = base_layer.weight.detach().clone()
        up, down = g["lora_up.weight"], g["lora_down.weight"]
        with torch.no_grad():
            if w.ndim == 4:
                x = torch.randn(1, w.shape[1], 8, 8)
                expected = torch.nn.functional.conv2d(x, w, base_layer.bias, padding=base_layer.padding)
                expected += scale * torch.nn.functional.conv2d(
                    torch.nn.functional.conv2d(x, down, padding=base_layer.padding), up)
            else:
                x = torch.randn(3, w.shape[1])
                expected = x @ (w + scale * up @ down).T + (base_layer.bias if base_layer.bias is not None else 0)
            got = layer(x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        checked.add(r)
    assert checked == {8, 2, 4}, "the test must cover modules of different ranks"
    # Fused: the base weight itself becomes W + scale * up @ down.
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    layer = unet.get_submodule(key)
    w0 = layer.base_layer.weight.detach().clone()
    pg.stack.apply(with_loras(LoraItem(str(files["mixed"]), 0.7)), fuse=True)
    g = groups["lora_unet_" + key.replace(".", "_")]
    expected = w0 + 0.7 * float(g["alpha"]) / g["lora_down.weight"].shape[0] * g["lora_up.weight"] @ g["lora_down.weight"]
    torch.testing.assert_close(layer.base_layer.weight.detach(), expected, rtol=1e-5, atol=1e-6)
    pg.stack.apply(BASE)
    assert torch.equal(layer.base_layer.weight, w0)


def test_unfuse_restores_the_base_exactly(pg, files):
    before = {k: v.clone() for k, v in pg.comps.unet.state_dict().items() if "lora_" not in k}
    pg.stack.apply(with_loras(LoraItem(str(files["a"]), 0.8), LoraItem(str(files["b"]), 0.3)), fuse=True)
    assert pg.stack.fused
    changed = {k for k, v in pg.comps.unet.state_dict().items() if k in before and not torch.equal(v, before[k])}
    assert changed, "fusing must change base weights"
    pg.stack.apply(BASE)
    assert not pg.stack.fused
    after = pg.comps.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_block_weights_all_one_equal_plain_and_all_zero_equal_base(pg, files):
    base = img(pg, BASE)
    plain = img(pg, with_loras(LoraItem(str(files["a"]), 0.9)))
    assert np.array_equal(img(pg, with_loras(LoraItem(str(files["a"]), 0.9, blocks=[1.0] * 26))), plain)
    assert np.array_equal(img(pg, with_loras(LoraItem(str(files["a"]), 0.9, blocks=[1.0] * 17))), plain)
    assert np.array_equal(img(pg, with_loras(LoraItem(str(files["a"]), 0.9, blocks=[0.0] * 26))), base)
    # Resnets and convs are covered, per module: IN01 = 0 switches off down_blocks.0.*.0, resnet conv included.
    blocks = [1.0] * 26
    blocks[2] = 0.0  # BASE, IN00, IN01 ...
    out = img(pg, with_loras(LoraItem(str(files["a"]), 0.9, blocks=blocks)))
    assert not np.array_equal(out, plain)
    conv = pg.comps.unet.get_submodule("down_blocks.0.resnets.0.conv1")
    other = pg.comps.unet.get_submodule("down_blocks.0.resnets.1.conv1")
    name = pg.stack.adapters[files["a"]].name
    assert name not in conv.active and name in other.active
    with pytest.raises(UserError, match="block weights"):
        pg.stack.apply(with_loras(LoraItem(str(files["a"]), 0.9, blocks=[1.0] * 5)))


def test_full_step_range_equals_no_range_and_partial_differs(pg, files):
    plain = img(pg, with_loras(LoraItem(str(files["a"]), 1.0)))
    full = img(pg, with_loras(LoraItem(str(files["a"]), 1.0, start=0.0, end=1.0)))
    assert np.array_equal(full, plain)
    half = img(pg, with_loras(LoraItem(str(files["a"]), 1.0, start=0.0, end=0.5)))
    base = img(pg, BASE)
    assert not np.array_equal(half, plain) and not np.array_equal(half, base)
    # Early steps off, late on: a different image again, and the range is restored after the run.
    late = img(pg, with_loras(LoraItem(str(files["a"]), 1.0, start=0.5, end=1.0)))
    assert not np.array_equal(late, half)
    assert all(pg.stack._range_on.values())


def test_weight_change_reads_no_file(pg, files, tiny_components, monkeypatch):
    reads = []
    real = stack_mod.read_adapter_file

    def counting(path, *a, **kw):  # counts reads; the real reader still runs
        reads.append(path)
        return real(path, *a, **kw)

    monkeypatch.setattr(stack_mod, "read_adapter_file", counting)
    c = files["a"].parent / "c.safetensors"
    save_safetensors(kohya_lora(tiny_components, 9), c)
    pg.stack.apply(with_loras(LoraItem(str(c), 1.0)))
    assert len(reads) == 1
    unet_layer = pg.comps.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q")
    name = pg.stack.adapters[c].name
    for w in (0.2, 0.7, 1.3):
        pg.stack.apply(with_loras(LoraItem(str(c), w)))
        assert unet_layer.scales[name] == pytest.approx(w)
    pg.stack.apply(with_loras(LoraItem(str(c), 0.5, enabled=False)))
    pg.stack.apply(with_loras(LoraItem(str(c), 0.5)))
    pg.stack.apply(BASE)
    pg.stack.apply(with_loras(LoraItem(str(c), 0.4)))  # removed then re-added: still loaded
    assert len(reads) == 1


def test_lora_for_another_family_is_one_clear_error(pg, tmp_path):
    sd = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 640),
          "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(640, 4),
          "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280),
          "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 4)}
    p = save_safetensors(sd, tmp_path / "xl.safetensors")
    with pytest.raises(UserError, match="SDXL"):
        pg.stack.apply(with_loras(LoraItem(str(p), 1.0)))
    # Right names, wrong width (an SD2 file's 1024-wide cross-attention on this base).
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    p2 = save_safetensors({f"{name}.lora_down.weight": torch.zeros(4, 1024),
                           f"{name}.lora_up.weight": torch.zeros(32, 4)}, tmp_path / "sd2.safetensors")
    with pytest.raises(UserError, match="SD 2"):
        pg.stack.apply(with_loras(LoraItem(str(p2), 1.0)))
    with pytest.raises(UserError, match="does not exist"):
        pg.stack.apply(with_loras(LoraItem(str(tmp_path / "missing.safetensors"), 1.0)))


def test_diffusers_and_peft_key_styles_load_like_kohya(pg, files, tiny_components, tmp_path):
    """The same LoRA written with diffusers/peft keys (alpha folded as diffusers would need it) gives the same
    image as the kohya file."""
    from safetensors.torch import load_file

    sd = load_file(files["a"])
    names = kohya_names_for(tiny_components.unet, "unet")
    te_names = kohya_names_for(tiny_components.text_encoder, "te")
    conv = {}
    for key, v in sd.items():
        mod, _, rest = key.partition(".")
        path = ("unet." + names[mod]) if mod in names else ("text_encoder.text_model." + te_names[mod])
        if rest == "alpha":
            conv[f"{path}.alpha"] = v
        else:
            conv[f"{path}.{'lora_A' if 'down' in rest else 'lora_B'}.weight"] = v
    p = save_safetensors(conv, tmp_path / "diffusers_style.safetensors")
    assert np.array_equal(img(pg, with_loras(LoraItem(str(p), 0.8))), img(pg, with_loras(LoraItem(str(files["a"]), 0.8))))


def _loha(comps, seed, rank=4, alpha=2.0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, path in kohya_names_for(comps.unet, "unet").items():
        if "attn" not in path and "resnets" not in path:
            continue
        w = comps.unet.get_submodule(path).weight
        out_dim, in_dim = w.shape[0], w[0].numel()
        for k in ("1", "2"):
            sd[f"{name}.hada_w{k}_a"] = torch.randn(out_dim, rank, generator=g) * 0.3
            sd[f"{name}.hada_w{k}_b"] = torch.randn(rank, in_dim, generator=g) * 0.3
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def _lokr(comps, seed, rank=2, alpha=1.0):
    from sdstudio.adapters.maths import factorization

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, path in kohya_names_for(comps.unet, "unet").items():
        mod = comps.unet.get_submodule(path)
        mod = getattr(mod, "base_layer", mod)
        if not isinstance(mod, torch.nn.Linear) or "attn" not in path:
            continue
        out_l, out_k = factorization(mod.out_features)
        in_m, in_n = factorization(mod.in_features)
        sd[f"{name}.lokr_w1"] = torch.randn(out_l, in_m, generator=g) * 0.5
        if rank < max(out_k, in_n) / 2:
            sd[f"{name}.lokr_w2_a"] = torch.randn(out_k, rank, generator=g) * 0.5
            sd[f"{name}.lokr_w2_b"] = torch.randn(rank, in_n, generator=g) * 0.5
        else:
            sd[f"{name}.lokr_w2"] = torch.randn(out_k, in_n, generator=g) * 0.5
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def test_loha_and_lokr_load_and_change_the_output(pg, tiny_components, tmp_path):
    base = img(pg, BASE)
    loha = save_safetensors(_loha(tiny_components, 5), tmp_path / "loha.safetensors")
    lokr = save_safetensors(_lokr(tiny_components, 6), tmp_path / "lokr.safetensors")
    out_loha = img(pg, with_loras(LoraItem(str(loha), 1.0)))
    out_lokr = img(pg, with_loras(LoraItem(str(lokr), 1.0)))
    assert np.abs(out_loha - base).mean() > 0.5 and np.abs(out_lokr - base).mean() > 0.5
    assert {pg.stack.adapters[loha].kind, pg.stack.adapters[lokr].kind} == {"lycoris"}
    # LoHa numbers: delta = (w1a w1b) * (w2a w2b) * alpha / r, per module.
    from safetensors.torch import load_file

    sd = load_file(loha)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"
    kname = "lora_unet_" + key.replace(".", "_")
    layer = pg.comps.unet.get_submodule(key)
    pg.stack.apply(with_loras(LoraItem(str(loha), 0.5)))
    x = torch.randn(2, 32)
    delta = (sd[f"{kname}.hada_w1_a"] @ sd[f"{kname}.hada_w1_b"]) * (sd[f"{kname}.hada_w2_a"] @ sd[f"{kname}.hada_w2_b"])
    base_w = layer.base_layer.weight
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (base_w + 0.5 * 2.0 / 4 * delta).T, rtol=1e-4, atol=1e-5)
    # LoRA + LoHa + LoKr stacked on the same modules, then all off: the base again, exactly.
    assert np.array_equal(img(pg, with_loras(LoraItem(str(loha), 0.0), LoraItem(str(lokr), 0.0))), base)


def test_a1111_pt_embedding_loads_safely_without_opt_in(pg, tmp_path):
    """Read with torch.load(weights_only=True), as ComfyUI does: no opt-in (tests/reliability proves that a
    payload in such a file never runs)."""
    import io

    vec = torch.randn(2, 32, generator=torch.Generator().manual_seed(4))
    buf = io.BytesIO()
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "mystyle", "step": 100}, buf)
    pt = tmp_path / "mystyle.pt"
    pt.write_bytes(buf.getvalue())
    recipe = BASE.replace(prompt="a photo in <mystyle> style", embedding=[EmbeddingItem(str(pt), "<mystyle>")])
    session = Playground(device="cpu")
    without = np.asarray(session.run(recipe.replace(embedding=[]))[0])
    with_emb = np.asarray(session.run(recipe)[0])
    assert not np.array_equal(with_emb, without)
    tok, te = session.comps.tokenizer, session.comps.text_encoder
    internal = session.stack.embeddings[pt].internal[0]
    assert len(internal) == 2  # multi-vector
    ids = tok.convert_tokens_to_ids(internal)
    torch.testing.assert_close(te.get_input_embeddings().weight[ids], vec)
    # Disabled: the token is plain text again, as if never loaded.
    off = np.asarray(session.run(recipe.replace(embedding=[EmbeddingItem(str(pt), "<mystyle>", enabled=False)]))[0])
    assert np.array_equal(off, without)


def test_embedding_formats_round_trip(tmp_path):
    from sdstudio.formats.embeddings import load_embedding, save_embedding

    v = torch.randn(3, 32)
    for fmt, name in (("a1111", "e.safetensors"), ("diffusers", "learned_embeds.safetensors"), ("pt", "e.pt")):
        p = save_embedding(tmp_path / name, v, "<tok>", fmt=fmt)
        e = load_embedding(p)
        torch.testing.assert_close(e.vectors[0], v)
        assert e.num_vectors == 3
    xl = save_embedding(tmp_path / "xl.safetensors", [torch.randn(2, 768), torch.randn(2, 1280)], "<x>")
    e = load_embedding(xl)
    assert [t.shape[1] for t in e.vectors] == [768, 1280]


def test_prompt_lora_tags_resolve_against_models_lora(pg, files, tmp_path):
    from sdstudio.playground.prompt_tags import extract_prompt_loras, resolve_prompt_loras

    clean, tags = extract_prompt_loras("a dog, <lora:style:0.6>, sunny <lora:b:0.5:0.2>")
    assert clean == "a dog, sunny" and tags == [("style", 0.6, 0.6), ("b", 0.2, 0.5)]
    lora_dir = files["a"].parent
    r = resolve_prompt_loras(BASE.replace(prompt="a dog <lora:a:0.7>"), lora_dir)
    assert r.prompt == "a dog" and r.lora[0].path == str(files["a"]) and r.lora[0].weight == 0.7
    with pytest.raises(UserError, match="nosuch"):
        resolve_prompt_loras(BASE.replace(prompt="<lora:nosuch:1>"), lora_dir)


def test_stack_is_listed_twice_error(pg, files):
    with pytest.raises(UserError, match="twice"):
        pg.stack.apply(with_loras(LoraItem(str(files["a"]), 1.0), LoraItem(str(files["a"]), 0.5)))


def test_several_unfused_loras_run_as_one_mix_that_sums_them(pg, files):
    """Two or more LoRAs on a layer run as one concatenated low-rank pair; it must equal the per-LoRA sum."""
    from safetensors.torch import load_file

    pg.stack.apply(with_loras(LoraItem(str(files["a"]), 0.6), LoraItem(str(files["b"]), -0.4)))
    key = "up_blocks.1.resnets.0.conv2"
    layer = pg.comps.unet.get_submodule(key)
    names = [pg.stack.adapters[files[n]].name for n in ("a", "b")]
    assert layer.active == names and layer._mix is not None and layer._mix[0].shape[0] == 4 + 8
    kname = "lora_unet_" + key.replace(".", "_")
    x = torch.randn(1, layer.base_layer.in_channels, 8, 8)
    pad = layer.base_layer.padding
    with torch.no_grad():
        expected = layer.base_layer(x)
        for f, w in ((files["a"], 0.6), (files["b"], -0.4)):
            sd = load_file(f)
            down, up, alpha = sd[f"{kname}.lora_down.weight"], sd[f"{kname}.lora_up.weight"], float(sd[f"{kname}.alpha"])
            expected += w * alpha / down.shape[0] * torch.nn.functional.conv2d(
                torch.nn.functional.conv2d(x, down, padding=pad), up)
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)
    # A weight change rescales the mix in place; the image follows.
    one = img(pg, with_loras(LoraItem(str(files["a"]), 0.6), LoraItem(str(files["b"]), -0.4)))
    two = img(pg, with_loras(LoraItem(str(files["a"]), 0.6), LoraItem(str(files["b"]), 0.4)))
    assert not np.array_equal(one, two)
    assert np.array_equal(img(pg, with_loras(LoraItem(str(files["a"]), 0.6), LoraItem(str(files["b"]), -0.4))), one)


def test_set_adapters_by_file_name_equals_applying_the_new_weight(pg, files):
    pg.stack.apply(with_loras(LoraItem(str(files["a"]), 0.9), LoraItem(str(files["b"]), 0.3)))
    reads = files_mod.FILE_READS["count"]
    pg.stack.set_adapters({"a.safetensors": 0.2})
    from sdstudio.playground.pipeline import generate

    via_set = np.asarray(generate(pg.comps, BASE, stack=pg.stack)[0]).astype(np.int16)
    assert files_mod.FILE_READS["count"] == reads
    assert np.array_equal(via_set, img(pg, with_loras(LoraItem(str(files["a"]), 0.2), LoraItem(str(files["b"]), 0.3))))


def test_diffusers_saved_lora_with_rank_and_alpha_patterns_loads_exactly(tmp_path):
    """diffusers' save_lora_weights keeps the LoraConfig (r, lora_alpha, rank/alpha patterns) in the header."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from sdstudio.models.loading import load_base
    from sdstudio.playground.stack import Stack

    torch.manual_seed(0)
    src = load_base("tiny")
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    k = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k"], init_lora_weights=False,
                     rank_pattern={q: 2}, alpha_pattern={q: 6})
    inject_adapter_in_model(cfg, src.unet, "x")
    x = torch.randn(2, 32)
    with torch.no_grad():
        expected = {p: src.unet.get_submodule(p)(x) for p in (q, k)}
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(src.unet, adapter_name="x"),
                                              unet_lora_adapter_metadata=cfg.to_dict())
    target = load_base("tiny")
    Stack(target).apply(Recipe(lora=[LoraItem(str(next(tmp_path.glob("*.safetensors"))), 1.0)]))
    with torch.no_grad():
        for p in (q, k):
            torch.testing.assert_close(target.unet.get_submodule(p)(x), expected[p], rtol=1e-5, atol=1e-5)


def reference(layer, x):
    """The layer's output the plain way: its base op on W + each active adapter's delta at its scale."""
    base = layer.base_layer
    w = base.weight + sum(layer.delta_weight(n) for n in layer.active)
    if isinstance(base, torch.nn.Conv2d):
        return base._conv_forward(x, w, base.bias)
    return torch.nn.functional.linear(x, w, base.bias)


def test_merged_on_the_fly_forward_equals_the_branch_and_is_picked_by_cost(pg, files, monkeypatch):
    """AdapterLayer.plan: with many tokens a layer runs its base op with W + B@A (one addmm per LoRA), with few
    it runs the low-rank branch; both give the plain W + delta output. Checked on a 3x3 conv (LoCon) and a
    Linear, with a two-LoRA mix and with one LoRA."""
    addmm, merges = torch.addmm, []

    def counting_addmm(*a, **k):
        merges.append(1)
        return addmm(*a, **k)

    monkeypatch.setattr(torch, "addmm", counting_addmm)
    monkeypatch.setattr(pg.stack.merged, "limit_bytes", 0)  # per-call choice only: nothing kept between calls
    for items in ([LoraItem(str(files["a"]), 0.6), LoraItem(str(files["b"]), -0.4)], [LoraItem(str(files["b"]), 0.7)]):
        pg.stack.apply(with_loras(*items))
        for key in ("up_blocks.1.resnets.0.conv2", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"):
            layer = pg.comps.unet.get_submodule(key)
            assert layer._run is not None, key
            base = layer.base_layer
            if isinstance(base, torch.nn.Conv2d):
                big, small = (2, base.in_channels, 32, 32), (1, base.in_channels, 1, 1)
            else:
                big, small = (2, 4096, base.in_features), (1, 1, base.in_features)
            with torch.no_grad():
                for shape, merged in ((big, True), (small, False)):
                    x = torch.randn(*shape)
                    merges.clear()
                    got = layer(x)
                    assert bool(merges) == merged, (key, shape)
                    want = reference(layer, x)
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_kept_merged_weights_are_exact_made_once_follow_changes_and_respect_the_budget(pg, files, monkeypatch):
    """Stack.merged keeps W + sum s B@A per layer after its first call under no_grad: later calls merge nothing
    and still give the plain W + delta output; a weight change, fusing or an in-place write makes a fresh one; layers
    past the byte budget merge per call; an emptied stack holds nothing."""
    addmm, merges = torch.addmm, []

    def counting_addmm(*a, **k):
        merges.append(1)
        return addmm(*a, **k)

    monkeypatch.setattr(torch, "addmm", counting_addmm)
    keys = ("up_blocks.1.resnets.0.conv2", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")

    def layers():
        return [pg.comps.unet.get_submodule(k) for k in keys]

    def check(*first_call_merges: bool):
        """Call each layer twice; `first_call_merges` says, per layer, whether its first call merges."""
        for layer, expect in zip(layers(), first_call_merges):
            base = layer.base_layer
            # Few tokens: without keeping, the per-call rule would take the branch (no addmm at all).
            x = torch.randn(1, base.in_channels, 2, 2) if isinstance(base, torch.nn.Conv2d) else torch.randn(1, 2, base.in_features)
            with torch.inference_mode():
                merges.clear()
                got = layer(x)
                assert bool(merges) == expect, layer
                merges.clear()
                again = layer(x)
                assert not merges, "a kept weight is merged once; without one, few tokens take the branch"
                want = reference(layer, x)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            assert torch.equal(got, again)

    monkeypatch.setattr(pg.stack.merged, "limit_bytes", None)
    # Weights no earlier test used (an unchanged plan keeps what an earlier generation merged).
    pg.stack.apply(with_loras(LoraItem(str(files["a"]), 0.55), LoraItem(str(files["b"]), -0.45)))
    check(True, True)
    held = pg.stack.merged.used
    assert held >= sum(lay.base_layer.weight.nbytes for lay in layers())
    check(False, False)  # kept from the first round

    pg.stack.set_adapters({str(files["b"]): 0.9})  # a weight change: new merged weights, right values
    check(True, True)
    layer = layers()[1]
    with torch.no_grad():  # an in-place write to the base weight (what fusing does) makes the kept one stale
        layer.base_layer.weight.mul_(1.5)
    check(False, True)
    with torch.no_grad():
        layer.base_layer.weight.div_(1.5)

    with torch.enable_grad():  # with autograd on (training), nothing kept is handed out
        x = torch.randn(1, 2, layer.base_layer.in_features)
        torch.testing.assert_close(layer(x), reference(layer, x))

    # A budget of one layer's weight: the first layer called keeps its weight, the second merges per call.
    one = layers()[0].base_layer.weight.nbytes
    monkeypatch.setattr(pg.stack.merged, "limit_bytes", one)
    pg.stack.set_adapters({str(files["b"]): 0.8})
    assert pg.stack.merged.used == 0  # every plan changed, so everything kept went
    check(True, False)  # the second has no kept weight, and few tokens take the branch
    assert pg.stack.merged.used == one
    pg.stack.apply(BASE)
    assert pg.stack.merged.used == 0


def test_a_mix_of_other_loras_at_the_same_scales_is_written_afresh(pg, files):
    """Two plain LoRAs on a layer run as one mixed pair. When the set changes but the scales do not, the new mix's
    B must still be written (it starts empty): the layer must give W + the sum of its LoRAs' own deltas."""
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    for second in ("b", "mixed"):
        pg.stack.apply(with_loras(LoraItem(str(files["a"]), 0.45), LoraItem(str(files[second]), 0.45)))
        names = [pg.stack.adapters[files[n]].name for n in ("a", second)]
        layer = pg.comps.unet.get_submodule(key)
        base = layer.base_layer
        x = torch.randn(1, 3, base.in_features)
        with torch.inference_mode():
            got = layer(x)
            want = torch.nn.functional.linear(x, base.weight + sum(layer.delta_weight(n) for n in names), base.bias)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_dropping_unused_adapters_leaves_nothing_applied(pg, tiny_components, tmp_path):
    """An adapter dropped from memory (more unused ones than max_unused) stops acting on every layer, including
    layers no remaining adapter touches."""
    only_ff = save_safetensors(kohya_lora(tiny_components, 11, only=["ff.net"]), tmp_path / "ff.safetensors")
    base = img(pg, BASE)
    assert np.abs(img(pg, with_loras(LoraItem(str(only_ff), 1.0))) - base).mean() > 1
    old = pg.stack.max_unused
    pg.stack.max_unused = 0
    try:
        assert np.array_equal(img(pg, BASE), base)
        assert only_ff not in pg.stack.adapters
    finally:
        pg.stack.max_unused = old
