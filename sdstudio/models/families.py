"""ModelFamily: the few facts that differ between SD1.x, SD2.x and SDXL, and the configs that let a
single-file checkpoint of each load with no network."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError


@dataclass(frozen=True)
class ModelFamily:
    name: str  # "sd1" | "sd2" | "sdxl"
    label: str
    prediction_type: str  # "epsilon" | "v_prediction"
    resolution: int  # the native training resolution
    text_encoders: int  # 1, or 2 for SDXL
    pipeline_class: str
    # Per-component configs of the real model, used to load single files offline.
    unet: dict = field(default_factory=dict, repr=False)
    vae: dict = field(default_factory=dict, repr=False)
    text: tuple = field(default_factory=tuple, repr=False)  # ((class name, config, pad token), ...)
    scheduler: tuple = field(default=("PNDMScheduler", {}), repr=False)

    @property
    def is_xl(self) -> bool:
        return self.text_encoders == 2


_SCALED_LINEAR = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1)

_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
               bos_token_id=49406, eos_token_id=49407, pad_token_id=1)

SD1 = ModelFamily(
    name="sd1", label="Stable Diffusion 1.x", prediction_type="epsilon", resolution=512, text_encoders=1,
    pipeline_class="StableDiffusionPipeline",
    unet=dict(block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
              sample_size=64),
    vae=dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=512,
             down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4),
    text=(("CLIPTextModel", _CLIP_L, "<|endoftext|>"),),
    scheduler=("PNDMScheduler", dict(_SCALED_LINEAR, skip_prk_steps=True, set_alpha_to_one=False)),
)

SD2 = ModelFamily(
    name="sd2", label="Stable Diffusion 2.x", prediction_type="v_prediction", resolution=768, text_encoders=1,
    pipeline_class="StableDiffusionPipeline",
    unet=dict(block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
              use_linear_projection=True, upcast_attention=True, sample_size=96),
    vae=dict(SD1.vae, sample_size=768),
    text=(("CLIPTextModel", dict(_CLIP_L, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                 num_attention_heads=16, projection_dim=512, hidden_act="gelu"), "!"),),
    scheduler=("DDIMScheduler", dict(_SCALED_LINEAR, prediction_type="v_prediction", clip_sample=False,
                                     set_alpha_to_one=False)),
)

SDXL = ModelFamily(
    name="sdxl", label="Stable Diffusion XL", prediction_type="epsilon", resolution=1024, text_encoders=2,
    pipeline_class="StableDiffusionXLPipeline",
    unet=dict(block_out_channels=[320, 640, 1280],
              down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
              up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
              transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
              use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
              projection_class_embeddings_input_dim=2816, sample_size=128),
    vae=dict(SD1.vae, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    text=(("CLIPTextModel", _CLIP_L, "<|endoftext|>"),
          ("CLIPTextModelWithProjection", dict(_CLIP_L, hidden_size=1280, intermediate_size=5120,
                                               num_hidden_layers=32, num_attention_heads=20, projection_dim=1280,
                                               hidden_act="gelu"), "!")),
    scheduler=("EulerDiscreteScheduler", dict(_SCALED_LINEAR, interpolation_type="linear",
                                              timestep_spacing="leading")),
)

FAMILIES = {f.name: f for f in (SD1, SD2, SDXL)}


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"Unknown model family {name!r}: use one of {', '.join(FAMILIES)}.") from None


def detect_family_from_keys(keys) -> ModelFamily:
    """Which family an original-layout (LDM/A1111) checkpoint belongs to, from its tensor names alone."""
    keys = set(keys)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return SDXL
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return SD2
    if any(k.startswith("cond_stage_model.transformer.") for k in keys) or any(
            k.startswith("model.diffusion_model.") for k in keys):
        return SD1
    raise UserError("This file is not a Stable Diffusion checkpoint (no model.diffusion_model.* keys): "
                    "is it a LoRA or an embedding? Put those in models/lora or models/embeddings.")


def detect_family_from_unet_config(cfg: dict) -> ModelFamily:
    """The family of a diffusers UNet, from its config."""
    if cfg.get("addition_embed_type") == "text_time":
        return SDXL
    if cfg.get("use_linear_projection") or cfg.get("cross_attention_dim") == 1024:
        return SD2
    return SD1
