"""The built-in tiny models: the real SD-1.5 ("tiny") and SDXL ("tiny-sdxl") architectures, narrow, with random
weights from a fixed seed.

Every module name, LDM single-file key, kohya LoRA name and LoRA-Block-Weight index is the same as on the real
model, so every code path a real model takes (save/load, single file, LoRA keys, TI tokens) runs on them.
Each is built offline in about a second and makes the same bytes every time. "tiny" is also the offline demo.
"""
from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

SEED = 1234
GLIGEN_SEED = SEED + 3  # the gated layers and the position net of the tiny GLIGEN model
TINY_LABEL = "tiny (offline demo, random weights)"
TINY_SDXL_LABEL = "tiny-sdxl (SDXL layout, random weights)"

# SD 1.5's block layout, only narrower (see DESIGN.md, "The built-in tiny model").
UNET_CONFIG = dict(
    sample_size=8,  # 8 latents * vae scale 8 = 64 px by default
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
    scaling_factor=0.18215,
)
TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
# SD 1.5's own scheduler settings.
SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
)

# SDXL's block layout, only narrower: DownBlock2D then 2 x CrossAttnDownBlock2D, 1/2/10 transformer layers per
# attention (70 cross-attention layers in all, as on the real SDXL), linear projections, `text_time` added
# conditioning (6 micro-conditioning numbers + the second encoder's pooled projection).
XL_TEXT_1 = dict(TEXT_CONFIG)  # CLIP-L-shaped: quick_gelu, no projection used, pads with <|endoftext|>
XL_TEXT_2 = dict(TEXT_CONFIG, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 projection_dim=64, hidden_act="gelu")  # bigG-shaped: wider, deeper, gelu, with a projection
# The two encoders differ in width on purpose, as CLIP-L (768) and bigG (1280) do: diffusers' single-file
# loader tells `conditioner.embedders.0` from `.1` by the position-embedding width.
XL_TIME_EMBED_DIM = 8
XL_UNET_CONFIG = dict(
    sample_size=8,  # 64 px by default, like "tiny"
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=XL_TEXT_1["hidden_size"] + XL_TEXT_2["hidden_size"],  # the two encoders, concatenated
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=XL_TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=6 * XL_TIME_EMBED_DIM + XL_TEXT_2["projection_dim"],
    norm_num_groups=32,
)
XL_VAE_CONFIG = dict(VAE_CONFIG, scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE scale; factor 8
XL_TEXT = (("CLIPTextModel", XL_TEXT_1, "<|endoftext|>"), ("CLIPTextModelWithProjection", XL_TEXT_2, "!"))


def bpe_path() -> Path:
    """open_clip ships the CLIP BPE merges; we read the vocabulary from there, with no download. Found without
    importing open_clip (that import takes seconds: it loads torch and its model zoo)."""
    from importlib.util import find_spec

    spec = find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise RuntimeError("open_clip_torch is not installed: pip install open_clip_torch (it ships CLIP's BPE file)")
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's reversible byte -> printable-unicode table (the same one GPT-2 uses).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The exact vocab.json / merges.txt of openai/clip-vit-large-patch14, rebuilt from the BPE file."""
    lines = gzip.open(bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """Write a CLIP tokenizer folder (vocab.json, merges.txt, configs) that transformers loads offline."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), pad_token=pad_token,
                        model_max_length=77)
    tok.save_pretrained(str(folder))


def build_components(family: str = "sd1") -> dict:
    """Build every component of a tiny pipeline ("sd1" or "sdxl") in memory, deterministically."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    xl = _check_family(family) == "sdxl"
    # Each module gets its own seed, so changing one never changes the bytes of another.
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**(XL_UNET_CONFIG if xl else UNET_CONFIG))
    torch.manual_seed(SEED + 1)
    vae = AutoencoderKL(**(XL_VAE_CONFIG if xl else VAE_CONFIG))
    if not xl:
        torch.manual_seed(SEED + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
        scheduler = PNDMScheduler(**SCHEDULER_CONFIG)
        return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), scheduler=scheduler)
    from .families import SDXL

    torch.manual_seed(SEED + 2)
    te1 = CLIPTextModel(CLIPTextConfig(**XL_TEXT_1))
    torch.manual_seed(SEED + 3)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**XL_TEXT_2))
    scheduler = EulerDiscreteScheduler(**SDXL.scheduler[1])  # SDXL's own scheduler settings
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=te1.eval(), text_encoder_2=te2.eval(),
                scheduler=scheduler)


def _check_family(family: str) -> str:
    if family not in ("sd1", "sdxl"):
        raise ValueError(f"tiny models exist for sd1 and sdxl, not {family!r}")
    return family


def save_pipeline(out: Path, parts: dict, marker: dict, marker_name: str = "sdstudio_tiny.json") -> Path:
    """Write a diffusers folder from built components (SD 1.x when there is one text encoder, SDXL with two),
    with CLIP tokenizers made offline, and a small JSON marker saying what it is."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    out = Path(out)
    write_tokenizer(out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
    if "text_encoder_2" in parts:
        write_tokenizer(out / "tokenizer_2", pad_token="!")  # OpenCLIP's tokenizer pads with "!" (id 0)
        tokenizer_2 = CLIPTokenizer.from_pretrained(str(out / "tokenizer_2"))
        pipe = StableDiffusionXLPipeline(tokenizer=tokenizer, tokenizer_2=tokenizer_2, add_watermarker=False,
                                         **parts)
    else:
        pipe = StableDiffusionPipeline(tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False, **parts)
    pipe.save_pretrained(str(out), safe_serialization=True)
    (out / marker_name).write_text(json.dumps(marker), encoding="utf-8")
    return out


def add_gligen(unet):
    """The tiny GLIGEN UNet: `unet` with diffusers' `attention_type="gated"` layers (a fuser in every transformer
    block and a text-box position net), made from GLIGEN_SEED.

    Every other weight is `unet`'s own, bit for bit: with no boxes it is the plain model. diffusers starts the
    gates at zero (a no-op until trained); here they start open (tanh(1) = 0.76), so boxes change the picture."""
    import torch
    from diffusers import UNet2DConditionModel

    # Built on the meta device (no random draw for the base weights), then given the base's tensors.
    with torch.device("meta"):
        config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
        gated = UNet2DConditionModel(**dict(config, attention_type="gated"))
    base = unet.state_dict()
    gated.load_state_dict(base, strict=False, assign=True)
    torch.manual_seed(GLIGEN_SEED)
    new = [name for name, _ in gated.named_modules() if name.endswith(".fuser") or name == "position_net"]
    for name in new:
        module = gated.get_submodule(name)
        module.to_empty(device="cpu")
        for sub in module.modules():  # each Linear / LayerNorm draws its own default init, in module order
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
        with torch.no_grad():
            for pname, p in module.named_parameters(recurse=False):
                if pname.startswith("alpha_"):
                    p.fill_(1.0)
                elif pname.startswith("null_"):
                    p.normal_(0.0, 0.02)
    return gated.eval()


def write_tiny_model(out: Path | str, family: str = "sd1", gligen: bool = False) -> Path:
    """Write a tiny model as a diffusers folder that `StableDiffusionPipeline.from_pretrained` (or, for
    "sdxl", `StableDiffusionXLPipeline.from_pretrained`) loads offline; `gligen=True` writes the tiny GLIGEN
    model (SD 1.x only: its UNet with gated layers, see `add_gligen`)."""
    xl = _check_family(family) == "sdxl"
    if gligen and xl:
        raise ValueError("the tiny GLIGEN model is SD 1.x only")
    parts = build_components(family)
    if gligen:
        parts["unet"] = add_gligen(parts["unet"])
    if xl:
        marker = {"seed": SEED, "label": TINY_SDXL_LABEL, "family": family}
    else:
        marker = {"seed": SEED, "label": TINY_LABEL} | ({"gligen_seed": GLIGEN_SEED} if gligen else {})
    return save_pipeline(Path(out), parts, marker)


def tiny_model_dir(family: str = "sd1") -> Path:
    """The cached tiny model folder, built once per machine (under $SDSTUDIO_CACHE or ~/.cache/sdstudio)."""
    from .. import __version__
    from ..formats.safe_io import build_once

    root = Path(os.environ.get("SDSTUDIO_CACHE", Path.home() / ".cache" / "sdstudio"))
    import diffusers
    import transformers

    # The folder name carries the library versions: a config written by one version is rebuilt for another.
    name = "tiny" if _check_family(family) == "sd1" else "tiny-sdxl"
    folder = root / f"{name}-{__version__}-d{diffusers.__version__}-t{transformers.__version__}"
    with build_once(folder, "model_index.json") as tmp:
        if tmp is not None:
            write_tiny_model(tmp, family)
    return folder
