"""LoHa, LoKr, DoRA and AdaLoRA as trainers, on the tiny model.

- Round trip: what each method writes loads in our Playground and gives the in-training model's output.
- The files carry LyCORIS' key names and sd-scripts' ss_* metadata for the algorithm.
- Exact resume for each (AdaLoRA's rank allocation included).
- AdaLoRA ends at its budget, and its mixed-rank export loads in plain diffusers at the right scale per module.
(The contract test, tests/test_train_contract.py, runs every one of them 2 steps through the loop too.)"""
from __future__ import annotations

import json

import pytest
import torch

from sdstudio.events import Step
from sdstudio.formats.safe_io import read_safetensors_keys, read_safetensors_metadata
from sdstudio.methods.base import RunInfo
from sdstudio.methods.registry import get_method
from sdstudio.models.loading import load_base
from sdstudio.train.config import load_config
from train_helpers import fast_sets, make_images, make_kohya_dataset, train_until_stopped

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = {
    "loha": ["loha.rank=4", "loha.alpha=2", "loha.use_tucker=true", "loha.train_text_encoder=true"],
    "lokr": ["lokr.rank=2", "lokr.alpha=3", "lokr.factor=4", "lokr.decompose_both=true"],
    "dora": ["dora.rank=4", "dora.alpha=8", "dora.targets=locon", "dora.conv_rank=2"],
}


def _prepared(tmp_path, method: str, sets: list[str]):
    """Tiny base + the method's adapters with random (nonzero) weights, as if trained."""
    from sdstudio.data.folder import read_dataset

    ds = make_images(tmp_path / "ds", 2)
    cfg = load_config(None, [f"dataset={ds}", "base_model=tiny", "output_name=t", "resolution=64",
                             f"method={method}", f"{method}.save_precision=fp32", *sets])
    c = load_base("tiny")
    m = get_method(method)()
    m.run = RunInfo(cfg=cfg, run_dir=tmp_path, layout=read_dataset(ds), step=5, dataset_hash="abc")
    torch.manual_seed(0)
    m.prepare(c, cfg)
    with torch.no_grad():
        for p in list(c.unet.parameters()) + list(c.text_encoder.parameters()):
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return c, m, cfg


def _outputs(c):
    torch.manual_seed(4)
    lat, ts, ids = torch.randn(2, 4, 8, 8), torch.tensor([5, 800]), torch.randint(0, 1000, (2, 77))
    with torch.no_grad():
        return c.unet(lat, ts, c.text_encoder(ids, return_dict=False)[0], return_dict=False)[0]


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_written_file_loads_in_the_playground_and_gives_the_trained_output(method, tmp_path):
    from sdstudio.playground.recipe import LoraItem, Recipe
    from sdstudio.playground.stack import Stack

    c, m, cfg = _prepared(tmp_path, method, SETTINGS[method])
    trained = _outputs(c)
    [path] = m.save(c, tmp_path)
    fresh = load_base("tiny")
    base = _outputs(fresh)
    Stack(fresh).apply(Recipe(lora=[LoraItem(str(path), 1.0)]))
    got = _outputs(fresh)
    assert (trained - base).abs().max() > 1e-3, "the adapters must change the output for this to mean anything"
    torch.testing.assert_close(got, trained, rtol=1e-4, atol=1e-4)

    keys = read_safetensors_keys(path)
    meta = read_safetensors_metadata(path)
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"  # sd-scripts' id for every network
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    if method == "loha":
        assert args["algo"] == "loha" and args["use_tucker"] == "True"
        assert {f"{conv}.hada_t1", f"{conv}.hada_t2", f"{conv}.hada_w1_a", f"{conv}.alpha"} <= set(keys)
        assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.hada_w2_b") for k in keys)
    elif method == "lokr":
        assert args["algo"] == "lokr" and args["factor"] == "4" and args["decompose_both"] == "True"
        q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # 64 -> 64: w1 4x4 (factor 4)
        assert {f"{q}.lokr_w1", f"{q}.lokr_w2_a", f"{q}.lokr_w2_b", f"{q}.alpha"} <= set(keys)
        from safetensors.torch import load_file

        assert tuple(load_file(str(path))[f"{q}.lokr_w1"].shape) == (4, 4)
    else:
        assert args["algo"] == "locon" and args["dora_wd"] == "True"
        assert {f"{conv}.lora_down.weight", f"{conv}.lora_up.weight", f"{conv}.dora_scale", f"{conv}.alpha"} <= set(keys)


@pytest.mark.parametrize("method,extra", [
    ("loha", {"loha.rank": 2, "loha.targets": "attention"}),
    ("lokr", {"lokr.rank": 2, "lokr.factor": 4, "lokr.targets": "attention"}),
    ("dora", {"dora.rank": 2, "dora.targets": "attention"}),
    ("adalora", {"adalora.target_rank": 2, "adalora.initial_rank": 4, "adalora.tinit": 1, "adalora.tfinal": 2,
                 "adalora.delta_t": 1, "adalora.targets": "attention"}),
])
def test_stop_and_resume_repeats_the_uninterrupted_run(method, extra, tmp_path):
    from sdstudio.train.loop import train

    ds = make_kohya_dataset(tmp_path / "ds", n=2)
    opts = dict(method=method, max_steps=6, learning_rate=5e-3, **extra)
    straight_events = []
    straight = load_config(None, fast_sets(ds, tmp_path / "a", **opts))
    [a_file, *_] = train(straight, straight_events.append)

    resumed = load_config(None, fast_sets(ds, tmp_path / "b", **opts))
    train_until_stopped(resumed, 3)
    resumed_events = []
    [b_file, *_] = train(resumed, resumed_events.append, resume=True)

    log = lambda run: [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["loss"] for r in log(tmp_path / "a")] == [r["loss"] for r in log(tmp_path / "b")]
    from safetensors.torch import load_file

    sa, sb = load_file(str(a_file)), load_file(str(b_file))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    if method == "adalora":  # the allocation after the resume is the uninterrupted run's, step by step
        ranks = lambda evs: [e.extra["ranks"] for e in evs if isinstance(e, Step) and e.step > 3]  # noqa: E731
        assert ranks(straight_events) == ranks(resumed_events)
        assert read_safetensors_metadata(a_file)["sdstudio.adalora_ranks"] == \
            read_safetensors_metadata(b_file)["sdstudio.adalora_ranks"]


def test_adalora_ends_at_its_budget_and_its_mixed_rank_export_loads_in_plain_diffusers(tmp_path, tiny_dir):
    from diffusers import StableDiffusionPipeline

    from sdstudio.train.loop import train

    ds = make_kohya_dataset(tmp_path / "ds", n=2)
    events = []
    cfg = load_config(None, fast_sets(ds, tmp_path / "run", method="adalora", max_steps=8, learning_rate=2e-2,
                                      **{"adalora.target_rank": 2, "adalora.initial_rank": 6, "adalora.tinit": 1,
                                         "adalora.tfinal": 2, "adalora.delta_t": 2, "adalora.alpha": 6,
                                         "adalora.save_precision": "fp32", "lr_scheduler": "constant"}))
    outputs = train(cfg, events.append)
    steps = [e for e in events if isinstance(e, Step)]
    layers = len(steps[-1].extra["ranks"])
    assert steps[-1].extra["budget"] == 2 * layers
    assert steps[-1].extra["total_rank"] == 2 * layers  # total rank == budget at the end
    assert steps[0].extra["total_rank"] == 6 * layers  # every layer at initial_rank through the warm-up
    ranks = steps[-1].extra["ranks"]
    assert len(set(ranks.values())) > 1, "the budget should be spread unevenly: a mixed-rank file"

    lora = next(p for p in outputs if p.suffix == ".safetensors")
    assert next(p for p in outputs if p.name.endswith(".peft")).is_dir()  # the peft adapter, to continue in peft
    from safetensors.torch import load_file

    sd = load_file(str(lora))
    file_ranks = {k: v.shape[0] for k, v in sd.items() if k.endswith(".lora_down.weight")}
    assert sum(file_ranks.values()) == 2 * layers and len(set(file_ranks.values())) > 1
    assert {float(sd[k.replace(".lora_down.weight", ".alpha")]) for k in file_ranks} == {2.0}  # one alpha: see export

    # The trained model (peft's own AdaLoRA layers) against the file in a plain diffusers pipeline.
    method = get_method("adalora")()
    c = load_base("tiny")
    method.run = RunInfo(cfg=cfg, run_dir=tmp_path / "run")
    method.prepare(c, cfg)
    from sdstudio.train.checkpoint import latest_checkpoint, load_checkpoint

    _state, trainable, _ema, _extra = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    method.load_trainable_state_dict(c, trainable)
    method.tuner.rankallocator.mask_using_rank_pattern(c.unet, method.tuner.peft_config["default"].rank_pattern)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), safety_checker=None, requires_safety_checker=False)
    plain = _outputs_of(pipe.unet, c.text_encoder)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    want = _outputs_of(c.unet, c.text_encoder)
    got = _outputs_of(pipe.unet, c.text_encoder)
    assert (want - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # ... and in our Playground, the same.
    from sdstudio.playground.recipe import LoraItem, Recipe
    from sdstudio.playground.stack import Stack

    fresh = load_base("tiny")
    Stack(fresh).apply(Recipe(lora=[LoraItem(str(lora), 1.0)]))
    torch.testing.assert_close(_outputs_of(fresh.unet, c.text_encoder), want, rtol=1e-4, atol=1e-4)


def _outputs_of(unet, te):
    torch.manual_seed(4)
    lat, ts, ids = torch.randn(2, 4, 8, 8), torch.tensor([5, 800]), torch.randint(0, 1000, (2, 77))
    with torch.no_grad():
        return unet(lat, ts, te(ids, return_dict=False)[0], return_dict=False)[0]


def test_adalora_budget_schedule_follows_peft():
    """The schedule the Train tab draws is the one peft's allocator runs."""
    from peft.tuners.adalora.layer import RankAllocator

    from sdstudio.methods.adalora import AdaLoRAConfig, budget_schedule, schedule_steps

    layers, total = 7, 100
    ours = budget_schedule(12 * layers, 4 * layers, 10, 20, total)

    class Cfg:
        target_r, tinit, tfinal, deltaT, total_step, beta1, beta2 = 4, 10, 20, 5, total, 0.85, 0.85

    alloc = RankAllocator.__new__(RankAllocator)
    alloc.peft_config = Cfg
    alloc.init_bgt, alloc.target_bgt = 12 * layers, 4 * layers
    theirs = [alloc.budget_schedule(s)[0] for s in range(total)]
    assert [b for _, b in ours] == theirs
    assert schedule_steps(AdaLoRAConfig(), 1000) == (100, 200)
