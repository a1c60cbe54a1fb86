"""The contract every registered method meets (STYLE.md: one test runs every method, like diffusers'
PeftLoraLoaderMixinTests). A new method joins automatically by being in methods/registry.py.

Each method runs 2 steps on tiny (SD 1.5's layout) and on tiny-sdxl (SDXL's: two text encoders, added
micro-conditioning) through the one loop, emits Step and Preview events, and saves something
that a fresh diffusers pipeline loads (through the method's `load_output` hook) with a visible effect. The
dataset carries control images, which methods that declare `conditioning = ("control",)` train on (and are
generated with) and the others ignore; likewise a boxes.jsonl, which GLIGEN (`conditioning = ("boxes",)`) trains
on and is generated with. A method that does not train on a family says so on purpose
(`unsupported_families`): the preflight refuses it with that sentence, before any model loads."""
from __future__ import annotations

import pytest
import torch

from sdstudio.errors import UserError
from sdstudio.events import Preview, Status, Step
from sdstudio.methods.base import hook
from sdstudio.methods.registry import all_methods
from sdstudio.train.config import load_config
from sdstudio.train.loop import train
from train_helpers import fast_sets, make_kohya_dataset


def _image(pipe, prompt, **kw):
    out = pipe(prompt, num_inference_steps=2, guidance_scale=1.0, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(0), output_type="np", **kw)
    return torch.from_numpy(out.images[0])


BASES = {"tiny": "sd1", "tiny-sdxl": "sdxl"}


@pytest.mark.slow
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("name", sorted(all_methods()))
def test_every_method_trains_previews_and_saves_a_loadable_file(name, base, tmp_path, tiny_dir):
    ds = make_kohya_dataset(tmp_path / "ds", n=2, with_reg=True, with_cond=True, with_boxes=True)
    method_cls = all_methods()[name]
    # A method may name settings it needs on tiny (e.g. its placeholder token) as `contract_settings`.
    extra = dict(getattr(method_cls, "contract_settings", {}))
    cfg = load_config(None, fast_sets(ds, tmp_path / "run", method=name, max_steps=2, learning_rate=1e-3,
                                      base_model=base, **extra))
    refusal = getattr(method_cls, "unsupported_families", {}).get(BASES[base])
    if refusal:  # a deliberate, named refusal, said in the preflight: nothing loads, nothing is written
        with pytest.raises(UserError) as info:
            train(cfg, lambda e: None)
        assert str(info.value) == refusal and not (tmp_path / "run").exists()
        return
    events = []
    outputs = train(cfg, events.append)
    assert any(isinstance(e, Step) for e in events)
    assert [e.step for e in events if isinstance(e, Step)] == [1, 2]
    previews = [e for e in events if isinstance(e, Preview)]
    assert previews and all(p.exists() for e in previews for p in map(__import__("pathlib").Path, e.paths))
    controlled = "control" in getattr(method_cls, "conditioning", ())
    if controlled:  # each preview names the control image it was drawn from
        assert all(e.conditions and all(map(lambda p: __import__("pathlib").Path(p).is_file(), e.conditions))
                   for e in previews)
    assert isinstance(events[-1], Status) and events[-1].stage == "done"  # the Job running it ends with Finished
    assert outputs and all(p.exists() for p in outputs)

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from sdstudio.models.tiny import tiny_model_dir

    if BASES[base] == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir("sdxl")))
    else:
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), safety_checker=None,
                                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompt = cfg.sample_prompts[0]
    with torch.no_grad():
        base = _image(pipe, prompt)
        loaded = hook(method_cls(), "load_output")(pipe, outputs)
        kw = {}
        if controlled:
            from PIL import Image

            kw["image"] = Image.open(previews[0].conditions[0]).convert("RGB").resize((64, 64))
        if "boxes" in getattr(method_cls, "conditioning", ()):  # GLIGEN: objects in boxes, grounded on every step
            kw.update(gligen_phrases=["a red hat"], gligen_boxes=[[0.1, 0.05, 0.5, 0.4]],
                      gligen_scheduled_sampling_beta=1.0)
        tuned = _image(loaded, prompt, **kw)
    assert (tuned - base).abs().max() > 1e-4, f"{name}: the saved file has no visible effect in diffusers"
