"""Our adapter runtime (sdstudio/adapters) against LyCORIS' own code, from the `lycoris-lora` package (the test
extra; what kohya sd-scripts trains with as network_module = lycoris.kohya).

For each algorithm, LyCORIS' functional weight reconstruction (`diff_weight` / `kron_weight` /
`weight_decompose`) and its modules' forward must equal what our runtime computes from the same tensors: LoRA
and LoCon (with Tucker mid), LoHa (with Tucker cores), LoKr with factors 4, 8 and -1, whole and decomposed
factors, on Linear and Conv layers, and DoRA. The layouts come from LyCORIS' own `weight_gen`, so these are the
files LyCORIS writes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sdstudio.adapters import AdapterLayer, from_state, maths, new_loha, new_lokr, new_lora

lyco_general = pytest.importorskip("lycoris.functional.general")
from lycoris.functional import locon as ly_locon  # noqa: E402
from lycoris.functional import loha as ly_loha  # noqa: E402
from lycoris.functional import lokr as ly_lokr  # noqa: E402


def _randomise(*tensors):
    """weight_gen starts one factor at zero (a no-op adapter); give every tensor values."""
    g = torch.Generator().manual_seed(7)
    return [None if t is None else torch.randn(t.shape, generator=g) * 0.3 for t in tensors]


LINEAR = nn.Linear(96, 160)
CONV3 = nn.Conv2d(64, 96, 3, padding=1)
CONV1 = nn.Conv2d(64, 96, 1)


def test_factorization_matches_lycoris():
    for dim in list(range(1, 400)) + [640, 768, 1024, 1280, 2048, 5120]:
        for factor in (-1, 2, 4, 8, 16, 5, 12):
            assert maths.factorization(dim, factor) == lyco_general.factorization(dim, factor), (dim, factor)


def _module(kind: str, base: nn.Module, rank: int = 4, alpha: float = 2.0, **kw):
    """A LyCORIS module as sd-scripts trains it (lycoris.kohya), every tensor random; its custom_state_dict is
    what LyCORIS writes into a file for this layer."""
    import copy

    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    cls = {"lora": LoConModule, "loha": LohaModule, "lokr": LokrModule}[kind]
    torch.manual_seed(3)
    m = cls("lora_unet_x", copy.deepcopy(base), 1.0, lora_dim=rank, alpha=alpha, **kw)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad and p.ndim > 0:
                p.copy_(torch.randn_like(p) * 0.2)
    return m


def _file_tensors(m) -> tuple[dict, float]:
    sd = {k: v.detach() for k, v in m.custom_state_dict().items()}
    alpha = float(sd.pop("alpha"))
    return {k.removesuffix(".weight"): v for k, v in sd.items()}, alpha


@pytest.mark.parametrize("base,tucker", [(LINEAR, False), (CONV3, False), (CONV3, True), (CONV1, False)])
def test_lora_and_locon_delta_matches_lycoris(base, tucker):
    t, alpha = _file_tensors(_module("lora", base, alpha=3.0, use_tucker=tucker))
    assert ("lora_mid" in t) == (tucker and base is CONV3)
    want = ly_locon.diff_weight(t["lora_down"], t["lora_up"], t.get("lora_mid"), gamma=alpha / 4, backend="torch")
    ours = from_state("lora", t, tuple(base.weight.shape), alpha)
    torch.testing.assert_close(ours.delta(base.weight), want.reshape(base.weight.shape), rtol=1e-5, atol=1e-6)
    assert {k: v.shape for k, v in new_lora(base, 4, 3.0, tucker=tucker).state().items() if k != "alpha"} == \
        {k + (".weight" if k.startswith("lora_") else ""): v.shape for k, v in t.items()}


@pytest.mark.parametrize("base,tucker", [(LINEAR, False), (CONV3, False), (CONV3, True)])
def test_loha_delta_matches_lycoris(base, tucker):
    t, alpha = _file_tensors(_module("loha", base, use_tucker=tucker))
    assert ("hada_t1" in t) == tucker
    # LyCORIS' functional names the halves d(own) / u(p): the file's hada_w*_b / hada_w*_a.
    want = ly_loha.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], t.get("hada_t1"),
                               t.get("hada_t2"), gamma=alpha / 4, backend="torch")
    ours = from_state("loha", t, tuple(base.weight.shape), alpha)
    torch.testing.assert_close(ours.delta(base.weight), want.reshape(base.weight.shape), rtol=1e-5, atol=1e-6)
    assert {k: v.shape for k, v in new_loha(base, 4, 2.0, tucker=tucker).state().items() if k != "alpha"} == \
        {k: v.shape for k, v in t.items()}


LOKR_CASES = [(base, factor, both, full, tucker)
              for base in (LINEAR, CONV3) for factor in (4, 8, -1)
              for both, full in ((False, False), (True, False), (False, True))
              for tucker in ((False, True) if base is CONV3 else (False,))]


@pytest.mark.parametrize("base,factor,decompose_both,full_matrix,tucker", LOKR_CASES)
def test_lokr_delta_matches_lycoris_for_every_factorisation(base, factor, decompose_both, full_matrix, tucker):
    rank, alpha = 2, 3.0
    m = _module("lokr", base, rank, alpha, factor=factor, decompose_both=decompose_both, full_matrix=full_matrix,
                use_tucker=tucker)
    t, file_alpha = _file_tensors(m)
    ours = from_state("lokr", t, tuple(base.weight.shape), file_alpha)
    decomposed = "lokr_w1_a" in t or "lokr_w2_a" in t
    # LyCORIS scales by alpha / rank when a factor is a low-rank pair and by 1 when both are whole.
    scale = alpha / rank if decomposed else 1.0
    args = [t.get(k) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")]
    want = ly_lokr.kron_weight(*args, scale=scale, backend="torch")
    torch.testing.assert_close(ours.delta(base.weight), want.reshape(base.weight.shape), rtol=1e-5, atol=1e-6)
    if "lokr_t2" not in t:
        # `diff_weight` reads the rank off w2_a (for a Tucker w2 that is a side, not the rank: skipped there).
        via_diff = ly_lokr.diff_weight(*args, gamma=file_alpha, backend="torch")
        torch.testing.assert_close(ours.delta(base.weight), via_diff.reshape(base.weight.shape), rtol=1e-5,
                                   atol=1e-6)
    # The factors we train have LyCORIS' layout, so our files are the files LyCORIS writes.
    mine = new_lokr(base, rank, alpha, factor=factor, decompose_both=decompose_both, full_matrix=full_matrix,
                    tucker=tucker)
    assert {k: tuple(v.shape) for k, v in mine.state().items() if k != "alpha"} == \
        {k: tuple(v.shape) for k, v in t.items()}


def test_lokr_factor_options_give_the_layouts_the_issue_names():
    """factor 8 on a 320-wide layer gives (8, 40) factors; -1 gives (16, 20)."""
    lin = nn.Linear(320, 320)
    assert from_state("lokr", _file_tensors(_module("lokr", lin, factor=8))[0], (320, 320)).factors[0] == (8, 8)
    assert from_state("lokr", _file_tensors(_module("lokr", lin, factor=-1))[0], (320, 320)).factors[0] == (16, 16)


@pytest.mark.parametrize("base", [LINEAR, CONV1])
def test_dora_matches_lycoris_weight_decompose(base):
    down, up, _ = _randomise(*ly_locon.weight_gen(base.weight, 4, tucker=False))
    if base.weight.ndim == 4:
        down, up = down[:, :, None, None], up[:, :, None, None]
    adapter = from_state("lora", {"lora_down": down, "lora_up": up}, tuple(base.weight.shape), 2.0)
    magnitude = maths.dora_magnitude(base.weight) * (1 + 0.1 * torch.rand(base.weight.shape[0]).view(
        -1, *[1] * (base.weight.ndim - 1)))
    adapter.add_magnitude(base.weight, trainable=False)
    with torch.no_grad():
        adapter.dora_scale.copy_(magnitude)
    dw = ly_locon.diff_weight(down, up, None, gamma=0.5, backend="torch").reshape(base.weight.shape)
    want = lyco_general.weight_decompose(base.weight + dw, magnitude, 1, wd_on_out=True, backend="torch")
    torch.testing.assert_close(base.weight + adapter.delta(base.weight), want, rtol=1e-5, atol=1e-6)
    # Files from LyCORIS < 3 hold the magnitude per input channel, shaped (1, in, ...).
    per_in = (base.weight + dw).transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (base.weight.ndim - 2))
    per_in = per_in * 1.1
    want_in = lyco_general.weight_decompose(base.weight + dw, per_in, 1, wd_on_out=False, backend="torch")
    torch.testing.assert_close(maths.dora_weight(base.weight, dw, per_in), want_in, rtol=1e-5, atol=1e-6)


# -- whole modules: LyCORIS' trained module against our layer, on the same input --------------------------

@pytest.mark.parametrize("kind,base,kw", [
    ("lora", LINEAR, {}), ("lora", CONV3, {}), ("lora", CONV3, {"use_tucker": True}),
    ("lora", LINEAR, {"weight_decompose": True}), ("lora", CONV3, {"weight_decompose": True}),
    ("loha", LINEAR, {}), ("loha", CONV3, {"use_tucker": True}), ("loha", LINEAR, {"weight_decompose": True}),
    ("lokr", LINEAR, {"factor": 8}), ("lokr", CONV3, {"factor": 4, "use_tucker": True}),
    ("lokr", LINEAR, {"factor": -1, "decompose_both": True}), ("lokr", CONV3, {"factor": 8, "full_matrix": True}),
])
def test_lycoris_modules_state_dict_runs_the_same_in_our_layer(kind, base, kw):
    """A LyCORIS module's saved tensors (custom_state_dict: the file's keys) loaded into our AdapterLayer give
    LyCORIS' own forward."""
    import copy

    m = _module(kind, base, **kw)
    m.apply_to()
    x = torch.randn(2, 5, 96) if isinstance(base, nn.Linear) else torch.randn(2, 64, 7, 7)
    with torch.no_grad():
        want = m(x)
    tensors, alpha = _file_tensors(m)
    layer = AdapterLayer(copy.deepcopy(base))
    layer.add("x", from_state(kind, tensors, tuple(base.weight.shape), alpha))
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_new_adapters_start_as_no_change():
    for make, base in ((new_lora, CONV3), (new_loha, CONV3), (new_lokr, LINEAR)):
        a = make(base, 4, 4.0)
        assert float(a.delta(base.weight).abs().max()) == 0.0
    d = new_lora(LINEAR, 4, 4.0, dora=True)
    assert float(d.delta(LINEAR.weight).abs().max()) < 1e-5
