"""Every LyCORIS layout loads in the Playground and gives LyCORIS' own output: LoKr in every factorisation
(factor 4, 8, -1; whole or decomposed w1/w2; Tucker w2), LoHa with Tucker t1/t2, DoRA's dora_scale, and the
same algorithms written with peft keys. Files are built here from LyCORIS' and peft's own modules on the tiny
model's real module names, then stacked through the Playground."""
from __future__ import annotations

import copy

import pytest
import torch

from sdstudio.formats.kinds import kohya_unet_name
from sdstudio.formats.safe_io import save_safetensors
from sdstudio.playground.recipe import LoraItem, Recipe
from sdstudio.playground.stack import Stack

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LINEAR = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # 64 -> 64
CROSS = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # 32 -> 64
CONV3 = "down_blocks.1.resnets.0.conv1"  # 32 -> 64, 3x3
FF = "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"  # 64 -> 512


def _lycoris(kind: str, module, **kw):
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    cls = {"lora": LoConModule, "loha": LohaModule, "lokr": LokrModule}[kind]
    m = cls("x", copy.deepcopy(module), 1.0, lora_dim=kw.pop("rank", 4), alpha=kw.pop("alpha", 2.0), **kw)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad and p.ndim > 0:
                p.copy_(torch.randn_like(p) * 0.1)
    m.apply_to()
    return m


CASES = {  # name: [(module path, algorithm, LyCORIS options)]
    "lokr-factor4": [(LINEAR, "lokr", {"factor": 4}), (CONV3, "lokr", {"factor": 4})],
    "lokr-factor8-decomposed": [(FF, "lokr", {"factor": 8, "decompose_both": True, "rank": 2}),
                                (CROSS, "lokr", {"factor": 8, "rank": 2})],
    "lokr-square-full": [(LINEAR, "lokr", {"factor": -1, "full_matrix": True}),
                         (CONV3, "lokr", {"factor": -1, "use_tucker": True, "rank": 2})],
    "loha-tucker": [(CONV3, "loha", {"use_tucker": True}), (LINEAR, "loha", {})],
    "dora": [(LINEAR, "lora", {"weight_decompose": True}), (CONV3, "loha", {"weight_decompose": True}),
             (FF, "lokr", {"factor": 8, "weight_decompose": True})],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lycoris_files_load_and_match_lycoris_forward(case, tiny_components, tmp_path):
    c = tiny_components
    sd, modules = {}, {}
    for path, kind, kw in CASES[case]:
        m = _lycoris(kind, c.unet.get_submodule(path), **dict(kw))
        modules[path] = m
        sd.update({f"{kohya_unet_name(path)}.{k}": v.detach().clone() for k, v in m.custom_state_dict().items()})
    f = save_safetensors(sd, tmp_path / f"{case}.safetensors")
    from sdstudio.models.loading import load_base

    target = load_base("tiny")
    stack = Stack(target)
    stack.apply(Recipe(lora=[LoraItem(str(f), 0.7)]))
    for path, m in modules.items():
        base = c.unet.get_submodule(path)
        x = torch.randn(2, base.in_channels, 6, 6) if isinstance(base, torch.nn.Conv2d) else torch.randn(2, 5, base.in_features)
        with torch.no_grad():
            m.multiplier = 1.0
            full = m(x)
            want = base(x) + 0.7 * (full - base(x))  # weight 0.7: 0.7 of the change (A1111 / ComfyUI)
            got = target.unet.get_submodule(path)(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("algorithm", ["loha", "loha-tucker", "lokr", "dora"])
def test_peft_key_lycoris_files_load_like_peft_runs_them(algorithm, tmp_path):
    """peft's LoHa / LoKr / DoRA-LoRA saved with peft keys (`unet.<path>.hada_w1_a`) and its config in the header:
    the Playground applies what peft's own layers compute."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from sdstudio.models.loading import load_base

    torch.manual_seed(0)
    src = load_base("tiny")
    targets = [LINEAR, CONV3, FF]
    cfg = {"loha": LoHaConfig(r=4, alpha=2, target_modules=targets, init_weights=False),
           "loha-tucker": LoHaConfig(r=4, alpha=8, target_modules=targets, init_weights=False,
                                     use_effective_conv2d=True),
           "lokr": LoKrConfig(r=2, alpha=3, target_modules=targets, init_weights=False, decompose_factor=4),
           "dora": LoraConfig(r=4, lora_alpha=6, target_modules=targets, init_lora_weights=False, use_dora=True),
           }[algorithm]
    inject_adapter_in_model(cfg, src.unet)
    with torch.no_grad():
        for n, p in src.unet.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.2)  # a magnitude that is not the base weight's own norm
    xs = {}
    with torch.no_grad():
        for path in targets:
            layer = src.unet.get_submodule(path)
            base = layer.get_base_layer()
            xs[path] = torch.randn(2, base.in_channels, 6, 6) if isinstance(base, torch.nn.Conv2d) else \
                torch.randn(2, 5, base.in_features)
            xs[path] = (xs[path], layer(xs[path]))
    sd = {f"unet.{k}": v for k, v in get_peft_model_state_dict(src.unet).items()}
    import json

    meta = {"lora_adapter_metadata": json.dumps({f"unet.{k}": (sorted(v) if isinstance(v, set) else v)
                                                 for k, v in cfg.to_dict().items()}, default=str)}
    f = save_safetensors(sd, tmp_path / f"{algorithm}.safetensors", meta)
    target = load_base("tiny")
    Stack(target).apply(Recipe(lora=[LoraItem(str(f), 1.0)]))
    with torch.no_grad():
        for path, (x, want) in xs.items():
            torch.testing.assert_close(target.unet.get_submodule(path)(x), want, rtol=1e-4, atol=2e-5)


def test_unsupported_lycoris_algorithm_is_one_clear_error(tmp_path):
    from sdstudio.errors import UserError
    from sdstudio.models.loading import load_base

    name = kohya_unet_name(LINEAR)
    f = save_safetensors({f"{name}.oft_blocks": torch.zeros(4, 16, 16), f"{name}.alpha": torch.tensor(1.0)},
                         tmp_path / "oft.safetensors")
    with pytest.raises(UserError, match="OFT"):
        Stack(load_base("tiny")).apply(Recipe(lora=[LoraItem(str(f), 1.0)]))
