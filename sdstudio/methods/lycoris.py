"""The LyCORIS family as trainers: LoHa, LoKr and DoRA. Read methods/lora.py first: these are the same setup
with another adapter per layer, from the one adapter runtime (sdstudio/adapters).

- LoHa: dW = (w1_a w1_b) * (w2_a w2_b), element-wise: two rank-r pairs reach rank r^2 for the same size.
  3x3 convolutions may use Tucker cores (hada_t1/t2), as LyCORIS' use_tucker does.
- LoKr: dW = kron(w1, w2): the Kronecker product of a small and a larger factor, split by `factor` (8 on a
  320-wide layer: w1 is 8 x 8, w2 40 x 40); either may be a low-rank pair (decompose_both) or whole
  (full_matrix). Tiny files; strong for characters and styles.
- DoRA: a LoRA/LoCon whose merged weight is renormalised to a learnt magnitude per output channel.
Every file uses LyCORIS' own key names (`hada_w1_a`, `lokr_w1`, `lokr_w2_a`, `dora_scale`, ...) with `.alpha`,
and the ss_* metadata sd-scripts writes for `network_module = lycoris.kohya`, so A1111, ComfyUI, kohya's
tools and our Playground load them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import adapters
from ..fields import setting
from .base import TE2_LR_HELP, MethodBase, ParamGroup, register, text_encoder_groups
from .lora import TARGETS, attach_adapters, te_target_names, unet_target_names

SAVE_DTYPES = ("fp16", "bf16", "fp32")


@dataclass
class AdapterSettings:
    """What every adapter method shares: the rank/alpha pair, the layers, the text encoder, the file."""

    rank: int = setting(8, "Rank (network dim): capacity and file size.", min=1, max=1024)
    alpha: float = setting(4.0, "Alpha: the update is scaled by alpha/rank.", min=0.0, max=4096.0)
    targets: str = setting("locon", "Which layers learn: attention, attention_mlp, or locon (+ convolutions).",
                           choices=TARGETS)
    conv_rank: int = setting(4, "Rank of the convolution adapters (locon only).", min=1, max=1024, advanced=True)
    conv_alpha: float = setting(1.0, "Alpha of the convolution adapters (locon only).", min=0.0, max=4096.0,
                                advanced=True)
    train_text_encoder: bool = setting(False, "Also train the text encoder (at its own lr).", advanced=True)
    text_encoder_lr: float = setting(5e-5, "Learning rate of the text encoder's adapters.", min=0.0, max=10.0,
                                     advanced=True)
    text_encoder_2_lr: float = setting(0.0, TE2_LR_HELP, min=0.0, max=10.0, advanced=True)
    save_precision: str = setting("fp16", "Precision of the saved file.", choices=SAVE_DTYPES, advanced=True)


@dataclass
class LoHaConfig(AdapterSettings):
    """The [loha] table."""

    use_tucker: bool = setting(False, "Tucker decomposition for 3x3 convolutions (LyCORIS use_tucker): fewer "
                               "parameters for the same rank.", advanced=True)
    dora: bool = setting(False, "Weight-decomposed (DoRA) on top: a learnt magnitude per output channel "
                         "(LyCORIS dora_wd).", advanced=True)


@dataclass
class LoKrConfig(AdapterSettings):
    """The [lokr] table."""

    rank: int = setting(16, "Rank of the factor stored as a low-rank pair (a rank this large or larger than half "
                        "the factor keeps it whole).", min=1, max=100_000)
    alpha: float = setting(8.0, "Alpha: the update is scaled by alpha/rank when a factor is a low-rank pair.",
                           min=0.0, max=100_000.0)
    factor: int = setting(8, "Split each dimension around this factor (LyCORIS factor): w1 is factor x factor. "
                          "-1: as square as possible.", min=-1, max=1024)
    decompose_both: bool = setting(False, "Store the small factor w1 as a low-rank pair too.", advanced=True)
    full_matrix: bool = setting(False, "Keep the large factor w2 whole (no low-rank pair).", advanced=True)
    use_tucker: bool = setting(False, "Tucker decomposition of w2 for 3x3 convolutions.", advanced=True)
    dora: bool = setting(False, "Weight-decomposed (DoRA) on top (LyCORIS dora_wd).", advanced=True)


@dataclass
class DoRAConfig(AdapterSettings):
    """The [dora] table."""

    rank: int = setting(16, "LoRA rank (network dim).", min=1, max=1024)
    alpha: float = setting(8.0, "LoRA alpha: the direction update is scaled by alpha/rank.", min=0.0, max=4096.0)
    targets: str = setting("attention_mlp", "Which layers learn: attention, attention_mlp, or locon (+ convs).",
                           choices=TARGETS)
    dropout: float = setting(0.0, "Dropout on the LoRA's input.", min=0.0, max=0.9, advanced=True)


class AdapterMethod(MethodBase):
    """Shared by LoHa, LoKr and DoRA: attach `new_adapter` on the chosen layers, train, write LyCORIS keys."""

    algo = ""  # LyCORIS' name for it in ss_network_args

    def new_adapter(self, module, rank: int, alpha: float):
        raise NotImplementedError

    def network_args(self) -> dict:
        """What sd-scripts records as ss_network_args (strings, as the command line gave them)."""
        o = self.cfg.options
        args = {"algo": self.algo, "conv_dim": str(o.conv_rank), "conv_alpha": str(o.conv_alpha)}
        if getattr(o, "use_tucker", False):
            args["use_tucker"] = "True"
        if getattr(o, "dora", False):
            args["dora_wd"] = "True"
        return args

    # 1. What trains: an adapter on each target layer (and optionally the text encoder); the base stays frozen.
    def prepare(self, c, cfg) -> list[ParamGroup]:
        o = cfg.options
        self.cfg = cfg
        linear, conv = unet_target_names(c.unet, o.targets)
        convs = set(conv)

        def make(mod, path):
            return self.new_adapter(mod, o.conv_rank, o.conv_alpha) if path in convs else \
                self.new_adapter(mod, o.rank, o.alpha)

        groups = [ParamGroup("unet", attach_adapters(c.unet, linear + conv, make), cfg.learning_rate)]
        if o.train_text_encoder:
            params = [attach_adapters(te, te_target_names(te, o.targets),
                                      lambda mod, path: self.new_adapter(mod, o.rank, o.alpha))
                      for te in c.text_encoders]
            groups += text_encoder_groups(params, o.text_encoder_lr, o.text_encoder_2_lr)
        return groups

    # For the VRAM/time estimate: a LoRA-sized adapter per layer (LoHa keeps two low-rank pairs; LoKr's factors
    # make it at most a LoRA's size), on the text encoder too when it trains.
    pairs = 1

    def footprint(self, cfg, arch, family):
        from .base import Footprint

        te = bool(cfg.options.train_text_encoder)
        return Footprint(trainable=self.pairs * (arch["unet_lora"] + (arch["te_lora"] if te else 0)),
                         text_encoder_trains=te)

    # 2. What is minimised: the standard denoising loss.
    def loss(self, c, batch, step):
        from ..train.noise import denoising_loss

        return denoising_loss(c, batch, self.cfg)

    # 3. What comes out: one .safetensors with LyCORIS keys and sd-scripts' ss_* metadata.
    def save(self, c, out: Path) -> list[Path]:
        import torch

        from ..formats.lora import save_kohya_lora
        from ..formats.metadata import training_metadata

        o = self.cfg.options
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[o.save_precision]
        meta = training_metadata(self.run, c.family, network_dim=o.rank, network_alpha=o.alpha,
                                 network_module="lycoris.kohya", network_args=self.network_args(), kind="lycoris",
                                 unet_lr=self.cfg.learning_rate,
                                 text_encoder_lr=o.text_encoder_lr if o.train_text_encoder else None,
                                 network_dropout=getattr(o, "dropout", None))
        meta["sdstudio.targets"] = o.targets
        tes = c.text_encoders if o.train_text_encoder else []
        path = Path(out) / f"{self.cfg.output_name}.safetensors"
        return [save_kohya_lora(path, c.unet, tes, meta, dtype, xl=c.family.is_xl)]

    def load_output(self, pipe, paths: list[Path]):
        """diffusers has no loader for LyCORIS keys: the file goes on the pipeline through our runtime, as the
        Playground loads it."""
        from ..formats.lora import load_into

        models = {"unet": pipe.unet, "te0": pipe.text_encoder}
        if getattr(pipe, "text_encoder_2", None) is not None:
            models["te1"] = pipe.text_encoder_2
        load_into(models, paths[0])
        return pipe


@register
class LoHa(AdapterMethod):
    name = algo = "loha"
    Config = LoHaConfig
    pairs = 2

    def new_adapter(self, module, rank, alpha):
        o: LoHaConfig = self.cfg.options
        return adapters.new_loha(module, rank, alpha, tucker=o.use_tucker, dora=o.dora)


@register
class LoKr(AdapterMethod):
    name = algo = "lokr"
    Config = LoKrConfig

    def new_adapter(self, module, rank, alpha):
        o: LoKrConfig = self.cfg.options
        return adapters.new_lokr(module, rank, alpha, factor=o.factor, decompose_both=o.decompose_both,
                                 full_matrix=o.full_matrix, tucker=o.use_tucker, dora=o.dora)

    def network_args(self) -> dict:
        o: LoKrConfig = self.cfg.options
        flags = {"decompose_both": o.decompose_both, "full_matrix": o.full_matrix}
        return {**super().network_args(), "factor": str(o.factor), **{k: "True" for k, on in flags.items() if on}}


@register
class DoRA(AdapterMethod):
    name = "dora"
    algo = "locon"  # LyCORIS trains DoRA as a LoCon with dora_wd
    Config = DoRAConfig

    def new_adapter(self, module, rank, alpha):
        return adapters.new_lora(module, rank, alpha, dora=True, dropout=self.cfg.options.dropout)

    def network_args(self) -> dict:
        return {**super().network_args(), "dora_wd": "True"}
