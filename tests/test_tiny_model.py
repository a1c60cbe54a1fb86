"""The built-in tiny model: the real SD-1.5 layout, deterministic bytes, the real CLIP tokenizer."""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest
import torch

from sdstudio.models import tiny


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(folder).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_same_bytes_every_time(tmp_path):
    a = tiny.write_tiny_model(tmp_path / "a")
    b = tiny.write_tiny_model(tmp_path / "b")
    assert _tree_hash(a) == _tree_hash(b)
    # and it is not trivially empty: the UNet weights are there
    assert (a / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size > 5_000_000


def test_sd15_layout(tiny_components):
    unet = tiny_components.unet
    assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    # The cross-attention down blocks do the downsampling, as in SD 1.5 (T2I-Adapter residuals need it).
    assert all(unet.down_blocks[i].downsamplers is not None for i in range(3))
    assert unet.down_blocks[3].downsamplers is None
    n_params = sum(p.numel() for p in unet.parameters())
    assert 2.3e6 < n_params < 2.6e6
    # 16 cross-attention layers, like SD 1.5 (EDLoRA and LoRA-Block-Weight rely on the count)
    cross = [n for n, _ in unet.named_modules() if n.endswith("attn2")]
    assert len(cross) == 16
    vae = tiny_components.vae
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8  # vae scale factor 8 like real SD
    # the same module names as a real SD 1.5 (kohya LoRA names depend on them)
    names = dict(unet.named_modules())
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in names
    assert "mid_block.attentions.0.proj_in" in names


def _open_clip_reference(text: str) -> list[int]:
    """open_clip's own tokenizer, which reads the same BPE file: the reference we must equal."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    return [tok.encoder["<start_of_text>"]] + tok.encode(text) + [tok.encoder["<end_of_text>"]]


@pytest.mark.parametrize("text", [
    "a photo of sks dog",
    "masterpiece, best quality, 1girl, looking at viewer, (red hair:1.2)",
    "Ünïcödé café — naïve résumé",
    "an astronaut riding a horse on mars, 8k, highly detailed",
    "<sks> toy, 123 4567",
])
def test_tokenizer_equals_open_clip(tiny_components, text):
    ids = tiny_components.tokenizer(text).input_ids
    assert ids == _open_clip_reference(text)


def test_tokenizer_known_ids(tiny_components):
    assert tiny_components.tokenizer("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert len(tiny_components.tokenizer) == 49408


def test_bpe_file_is_the_one_open_clip_ships():
    lines = gzip.open(tiny.bpe_path()).read().decode("utf-8").split("\n")
    assert len(lines) > 49152 - 256 - 2


def test_generates_deterministically(tiny_components):
    pipe = tiny_components.pipeline()
    run = lambda: pipe("a dog", num_inference_steps=3, generator=torch.Generator().manual_seed(1),
                       output_type="np").images
    a, b = run(), run()
    assert a.shape == (1, 64, 64, 3)
    assert (a == b).all()
