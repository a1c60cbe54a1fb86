"""Training on SDXL (the built-in tiny-sdxl): both text encoders as diffusers' pipeline encodes them, the dataset's
micro-conditioning (original size, crop, target size) through buckets and flips, the text cache with the pooled
embedding, each text encoder at its own lr, and the files: a kohya SDXL LoRA that plain diffusers loads at
alpha/rank x up@down, and a clip_l/clip_g embedding that diffusers loads with two calls."""
from __future__ import annotations

import json

import pytest
import torch

from sdstudio.methods.base import RunInfo
from sdstudio.methods.registry import get_method
from sdstudio.models.loading import load_base
from sdstudio.train.config import load_config
from train_helpers import fast_sets, make_images, make_kohya_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _xl_pipe():
    from diffusers import StableDiffusionXLPipeline

    from sdstudio.models.tiny import tiny_model_dir

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir("sdxl")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, prompt="a photo of sks person"):
    out = pipe(prompt, num_inference_steps=2, guidance_scale=1.0, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(3), output_type="np")
    return torch.from_numpy(out.images[0])


def test_prompt_encoding_matches_the_sdxl_pipeline_and_the_cache():
    """Our encoding (penultimate layers of both encoders side by side, pooled projection of the second) is what
    StableDiffusionXLPipeline.encode_prompt gives, and the text cache hands out the same tensors."""
    from sdstudio.train.loop import TextCache
    from sdstudio.train.text import encode_prompt, tokenize_prompt

    c = load_base("tiny-sdxl")
    caps = ["a photo of sks person", "a red cube"]
    with torch.no_grad():
        ours = encode_prompt(c, tokenize_prompt(c, caps))
        ref, _, ref_pooled, _ = c.pipeline().encode_prompt(caps, device="cpu", do_classifier_free_guidance=False)
    assert ours.hidden.shape[-1] == c.unet.config.cross_attention_dim
    torch.testing.assert_close(ours.hidden, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.pooled, ref_pooled, rtol=0, atol=1e-6)
    cached = TextCache(c, "cpu").get([caps[1], caps[0], caps[1]])
    torch.testing.assert_close(cached.hidden, ours.hidden[[1, 0, 1]], rtol=0, atol=0)
    torch.testing.assert_close(cached.pooled, ours.pooled[[1, 0, 1]], rtol=0, atol=0)


def test_micro_conditioning_follows_bucket_crop_and_flip():
    """time_ids = (orig h, orig w, crop top, crop left, target h, target w): the image's own size, where the
    bucket's sample sits in the cover-resized image (in flipped coordinates when flipped), the bucket."""
    from sdstudio.data.conditioning import CONDITIONS, Cut

    t = CONDITIONS["time_ids"]
    # 200x100 (w x h) into a 64x64 bucket: resized to 128x64, the centre crop starts 32 px from the left.
    assert t.read(None, Cut((200, 100), (64, 64))).tolist() == [100, 200, 0, 32, 64, 64]
    # A 100x300 portrait into a 64x128 bucket: resized to 64x192, cropped 32 px from the top.
    assert t.read(None, Cut((100, 300), (64, 128))).tolist() == [300, 100, 32, 0, 128, 64]
    # Off-centre crop (scaled width 131, bucket 64: 33 left, 34 right): flipping moves the crop's left edge.
    cut = Cut((131, 64), (64, 64))
    assert cut.offset == (33, 0)
    assert t.read(None, Cut((131, 64), (64, 64), flip=True)).tolist() == [64, 131, 0, 34, 64, 64]


def test_random_crops_move_the_pixels_and_the_time_ids_together(tmp_path):
    """random_crop: each (epoch, position) cuts the 64x96 image at its own height, and the time ids' crop top is
    exactly the row the pixels start at; the crop is a pure function of the seed (resume repeats it)."""
    import numpy as np
    from PIL import Image

    from sdstudio.data.dataset import TrainDataset
    from sdstudio.data.folder import read_dataset

    ds = make_kohya_dataset(tmp_path / "ds", n=2)
    cfg = load_config(None, fast_sets(ds, tmp_path / "run", base_model="tiny-sdxl", random_crop="true"))
    data = TrainDataset(read_dataset(ds), cfg, conditioning=("time_ids",))
    i = next(k for k, it in enumerate(data.items) if it.size == (64, 96))
    full = np.asarray(Image.open(data.items[i].path).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    tops = set()
    for epoch in range(3):
        for pos in range(4):
            shift = data.crop_shift(i, epoch, pos)
            assert shift == data.crop_shift(i, epoch, pos)
            ids = data.cond(i, "time_ids", False, shift).tolist()
            top = int(ids[2])
            assert ids[:2] == [96, 64] and ids[3] == 0 and ids[4:] == [64, 64] and 0 <= top <= 32
            pix = data.pixels(i, False, shift).permute(1, 2, 0).numpy()
            np.testing.assert_allclose(pix, full[top:top + 64], atol=1e-6)
            tops.add(top)
    assert len(tops) > 3  # it really moves
    off = TrainDataset(read_dataset(ds), load_config(None, fast_sets(ds, tmp_path / "r2", base_model="tiny-sdxl")),
                       conditioning=("time_ids",))
    assert off.crop_shift(i, 0, 0) is None and off.cond(i, "time_ids").tolist()[2] == 16  # centred


@pytest.mark.parametrize("cache", ["off", "memory"])
def test_the_loop_feeds_the_unet_each_items_time_ids_and_pooled_text(tmp_path, cache):
    """What reaches the UNet: added_cond_kwargs with the dataset's time ids for each item of the batch (flipped
    or not, cached latents or not) and the pooled embedding of its caption."""
    from sdstudio.train.loop import train

    ds = make_kohya_dataset(tmp_path / "ds", n=2)  # one 64x64 image and one 64x96 (w x h)
    cfg = load_config(None, fast_sets(ds, tmp_path / "run", base_model="tiny-sdxl", max_steps=4, flip="true",
                                      cache_latents=cache, buckets="true", sample_prompts="[]"))
    seen = []
    method = get_method("lora")()
    real_prepare = method.prepare

    def prepare(c, cfg):
        groups = real_prepare(c, cfg)
        forward = c.unet.forward

        def spy(sample, t, ehs, **kw):
            seen.append((tuple(sample.shape), kw["added_cond_kwargs"]["time_ids"].tolist(),
                         kw["added_cond_kwargs"]["text_embeds"].shape, ehs.shape))
            return forward(sample, t, ehs, **kw)
        c.unet.forward = spy
        return groups
    method.prepare = prepare
    train(cfg, lambda e: None, method=method)
    assert len(seen) == 4
    for shape, _ids, pooled, ehs in seen:
        assert shape[2:] == (8, 8) and pooled == (1, 64) and ehs[-1] == 96  # bigG proj; 32 + 64
    # At 64 px there is one bucket, 64x64: the square image is uncropped; the 64x96 one (w x h) is cropped 16 px
    # from the top. Its crop is centred, so a flip leaves crop-left at 0. Each item comes twice (2 repeats).
    assert sorted(tuple(ids) for _, [ids], _, _ in seen) == [(64, 64, 0, 0, 64, 64)] * 2 + [(96, 64, 16, 0, 64, 64)] * 2


def _trained(tmp_path, method_name, sets):
    """tiny-sdxl with a method's adapters at random nonzero weights, as if trained."""
    from sdstudio.data.folder import read_dataset

    ds = make_images(tmp_path / "ds", 2)
    cfg = load_config(None, [f"dataset={ds}", "base_model=tiny-sdxl", "output_name=t", "resolution=64",
                             f"method={method_name}", *sets])
    c = load_base("tiny-sdxl")
    method = get_method(method_name)()
    method.run = RunInfo(cfg=cfg, run_dir=tmp_path, layout=read_dataset(ds), step=7)
    torch.manual_seed(0)
    groups = method.prepare(c, cfg)
    with torch.no_grad():
        for g in groups:
            for p in g.params:
                p.copy_(torch.randn_like(p) * 0.2)
    return c, method, groups


def test_kohya_sdxl_lora_loads_in_plain_diffusers_at_alpha_over_rank(tmp_path):
    c, method, groups = _trained(tmp_path, "lora", [
        "lora.rank=4", "lora.alpha=2", "lora.train_text_encoder=true", "lora.save_precision=fp32",
        "lora.text_encoder_lr=3e-5", "lora.text_encoder_2_lr=1e-5"])
    # Each text encoder trains at its own lr (sd-scripts' two --text_encoder_lr values).
    assert {g.name: g.lr for g in groups} == {"unet": 1e-4, "text_encoder": 3e-5, "text_encoder_2": 1e-5}
    with torch.no_grad():
        expected = _image(c.pipeline())
    [path] = method.save(c, tmp_path)
    from sdstudio.formats.safe_io import load_state_dict, read_safetensors_metadata

    sd = load_state_dict(path)
    meta = read_safetensors_metadata(path)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert {k.split("_")[1] for k in sd} == {"unet", "te1", "te2"}
    pipe = _xl_pipe()
    base = _image(pipe)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    loaded = _image(pipe)
    assert (loaded - base).abs().max() > 1e-2
    torch.testing.assert_close(loaded, expected, atol=2e-3, rtol=0)
    # Fused, each weight moved by exactly alpha/rank x up@down (a UNet layer, and one in each text encoder).
    checks = {"unet": ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
                       "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"),
              "text_encoder": ("text_model.encoder.layers.0.self_attn.q_proj",
                               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
              "text_encoder_2": ("text_model.encoder.layers.1.mlp.fc2", "lora_te2_text_model_encoder_layers_1_mlp_fc2")}
    fresh = _xl_pipe()
    before = {part: fresh.components[part].get_submodule(_mod(fresh.components[part], p)).weight.detach().clone()
              for part, (p, _) in checks.items()}
    fresh.load_lora_weights(str(path.parent), weight_name=path.name)
    fresh.fuse_lora()
    for part, (p, key) in checks.items():
        after = fresh.components[part].get_submodule(_mod(fresh.components[part], p)).weight.detach()
        delta = (sd[f"{key}.alpha"] / 4) * sd[f"{key}.lora_up.weight"] @ sd[f"{key}.lora_down.weight"]
        torch.testing.assert_close(after - before[part], delta, atol=1e-5, rtol=1e-4)


def _mod(model, path):
    """The module path in this transformers version (5 has no `.text_model` level), as loaded (no base_layer)."""
    names = dict(model.named_modules())
    for p in (path, path.replace("text_model.", "", 1)):
        if p in names:
            return p
        if f"{p}.base_layer" in names:
            return f"{p}.base_layer"
    raise KeyError(path)


def test_sdxl_lora_loads_in_our_playground(tmp_path):
    from sdstudio.playground.pipeline import generate
    from sdstudio.playground.recipe import LoraItem, Recipe
    from sdstudio.playground.stack import Stack

    c, method, _ = _trained(tmp_path, "lora", ["lora.rank=4", "lora.alpha=2", "lora.train_text_encoder=true"])
    [path] = method.save(c, tmp_path)
    base = load_base("tiny-sdxl")
    stack = Stack(base)
    r = Recipe(prompt="a photo of sks person", steps=2, width=64, height=64, sampler="euler", cfg=1.0, seed=2)

    def run(recipe):
        stack.apply(recipe)
        return torch.from_numpy(__import__("numpy").asarray(generate(base, recipe, stack=stack)[0]).astype("int16"))

    plain, with_lora = run(r), run(r.replace(lora=[LoraItem(str(path), 1.0)]))
    assert (with_lora - plain).abs().float().mean() > 0.5


def test_sdxl_embedding_has_clip_l_and_clip_g_and_loads_in_diffusers(tmp_path):
    c, method, _ = _trained(tmp_path, "textual_inversion", ["textual_inversion.token=<sks-xl>",
                                                            "textual_inversion.num_vectors=2"])
    prompt = "a photo of <sks-xl>"
    with torch.no_grad():
        expected = _image(c.pipeline(), prompt)  # the pipeline expands the word to its vectors in both tokenizers
    [path] = method.save(c, tmp_path)
    from sdstudio.formats.safe_io import load_state_dict

    sd = load_state_dict(path)
    assert set(sd) == {"clip_l", "clip_g"}
    assert sd["clip_l"].shape == (2, 32) and sd["clip_g"].shape == (2, c.text_encoders[1].config.hidden_size)
    pipe = _xl_pipe()
    base = _image(pipe, prompt)
    pipe = method.load_output(pipe, [path])  # two load_textual_inversion calls, one per encoder
    loaded = _image(pipe, prompt)
    assert (loaded - base).abs().max() > 1e-3
    torch.testing.assert_close(loaded, expected, atol=1e-4, rtol=0)


def test_sdxl_exact_resume(tmp_path):
    """Stop at step 3 and resume: the same losses as an uninterrupted run, on SDXL with a text-encoder LoRA
    (both encoders train, so the text is encoded every step) and flips."""
    from sdstudio.train.loop import train
    from train_helpers import train_until_stopped

    ds = make_kohya_dataset(tmp_path / "ds", n=2)
    opts = dict(base_model="tiny-sdxl", max_steps=5, flip="true", caption_dropout=0.3, sample_prompts="[]",
                **{"lora.train_text_encoder": "true", "lora.rank": 4})
    straight = load_config(None, fast_sets(ds, tmp_path / "a", **opts))
    train(straight, lambda e: None)
    resumed = load_config(None, fast_sets(ds, tmp_path / "b", **opts))
    train_until_stopped(resumed, 3)
    train(resumed, lambda e: None, resume=True)

    def log(run):
        return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    a, b = log(tmp_path / "a"), log(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_large_previews_decode_in_tiles_and_the_estimate_counts_one_tile(tmp_path, monkeypatch):
    """A 1024 px SDXL preview decoded whole needs ~5 GB (10 with the fp16 VAE upcast), more than the step on a
    12 GB card: previews above PREVIEW_TILE_PX decode in tiles, and the VAE's own tiling comes back after. Here
    the tile is 32 px on a 64 px run (the tiny model; the real tile is 512 px)."""
    from sdstudio.train import preview
    from sdstudio.train.estimate import estimate
    from sdstudio.train.loop import train

    vae = load_base("tiny-sdxl").vae
    z = torch.randn(1, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = vae.decode(z).sample
    calls = []
    real = type(vae).tiled_decode
    monkeypatch.setattr(type(vae), "tiled_decode", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    with preview.tiled_decode(vae, 64):  # at or under the tile size: decoded whole, bit for bit
        assert torch.equal(vae.decode(z).sample, whole) and not calls
    with preview.tiled_decode(vae, 64, tile_px=32):
        tiled = vae.decode(z).sample
    assert calls and tiled.shape == whole.shape and not torch.equal(tiled, whole)
    # The first tile is the decode of its own 32 px of latent (4x4), up to where the next tiles blend in (25%).
    corner = vae.decode(z[:, :, :4, :4]).sample
    assert torch.allclose(tiled[..., :24, :24], corner[..., :24, :24], atol=1e-5)
    assert (vae.use_tiling, vae.tile_sample_min_size) == (False, vae.config.sample_size)

    # A training run's previews go through it.
    calls.clear()
    monkeypatch.setattr(preview, "PREVIEW_TILE_PX", 32)
    data = make_kohya_dataset(tmp_path / "ds", n=1)
    out = tmp_path / "run"
    train(load_config(None, fast_sets(data, out, base_model="tiny-sdxl", max_steps=1)), lambda e: None)
    assert calls and sorted(p.name for p in (out / "samples").glob("step-*.png")) == \
        ["step-000000-0.png", "step-000001-0.png"]

    # The estimate counts one tile: the 12 GB preset fits 12 GB, its peak is the step, not the preview.
    monkeypatch.setattr(preview, "PREVIEW_TILE_PX", 512)
    e = estimate(load_config("character-lora-sdxl-12gb"))
    assert e.fits(12) and "training activations" in e.parts and "preview decode" not in e.parts
    half = estimate(load_config("character-lora-sdxl-12gb", ["sample_every=0", "gradient_checkpointing=true",
                                                             "precision=fp16", "resolution=2048"]))
    assert half.parts.get("preview decode", 0) < 3  # (2048 px whole: 16x a 512 px decode)
