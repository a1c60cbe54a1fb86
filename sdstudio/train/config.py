"""TrainConfig: typed, bounded, documented settings; presets (partial TOML) merged over defaults.

One field's metadata (help, min, max, choices, advanced) drives three things: the Train tab's form, the
validation here, and the CLI's `--set key=value`. A method's own settings live in a table named after it
(`[lora]`, `[dreambooth]`, ...), which is that method's `Config` dataclass.

    method = "lora"            # top level: what every method shares
    base_model = "tiny"
    [lora]                     # the method's table
    rank = 16

An unknown key is an error naming the nearest valid key: a typo must never pass silently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..fields import _unknown, build_dataclass, merge, parse_sets, setting, user_fields  # noqa: F401  (re-exported)

SCHEMA_VERSION = 1
PRESETS_DIR = Path(__file__).resolve().parent.parent.parent / "presets"


PATH_KEYS = ("base_model", "dataset", "output_dir", "class_data")  # written workspace-relative in a run's config
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "lion")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass
class TrainConfig:
    """What every method shares. Basic settings first; `advanced=True` ones fold into the UI's accordion."""

    # -- basic ------------------------------------------------------------------------------------------
    method: str = setting("lora", "Training method: lora, dreambooth, full, textual_inversion, ...")
    base_model: str = setting("tiny", "Base model: 'tiny', a file or folder, a model in models/checkpoints by name, "
                              "or a hub id (org/name[@revision], downloaded into the workspace).")
    dataset: str = setting("", "Dataset folder: a kohya folder (with img/), or a folder of images with captions.")
    output_name: str = setting("my-lora", "Name of the run and of the file it makes.")
    output_dir: str = setting("", "Run folder (empty: runs/<output_name> in the workspace).", advanced=True)
    resolution: int = setting(512, "Training resolution in pixels (a multiple of 64).", min=64, max=2048)
    max_steps: int = setting(1000, "Optimizer steps to train.", min=1, max=1_000_000)
    batch_size: int = setting(1, "Images per step (per GPU).", min=1, max=256)
    learning_rate: float = setting(1e-4, "Learning rate (Prodigy: use 1.0).", min=0.0, max=10.0)
    seed: int = setting(42, "Seed: the same seed and settings give the same run.", min=0, max=2**31 - 1)
    save_every: int = setting(250, "Save a resumable checkpoint every N steps (0: only at the end).", min=0,
                              max=1_000_000)
    sample_every: int = setting(100, "Make preview images every N steps (0: only at the start and end).",
                                min=0, max=1_000_000)
    sample_prompts: list = setting(["a photo of sks person"], "Preview prompts, one image each, fixed seeds.")
    instance_prompt: str = setting("", "Caption for images that have none (e.g. 'a photo of sks person'); empty: "
                                   "every image needs a caption.")

    # -- optimizer and schedule -------------------------------------------------------------------------
    optimizer: str = setting("adamw", "Optimizer (adamw8bit needs a CUDA GPU and bitsandbytes).",
                             choices=OPTIMIZERS, advanced=True)
    lr_scheduler: str = setting("constant", "Learning-rate schedule.", choices=SCHEDULERS, advanced=True)
    warmup_steps: int = setting(0, "Steps of linear warmup at the start.", min=0, max=100_000, advanced=True)
    weight_decay: float = setting(1e-2, "Weight decay.", min=0.0, max=1.0, advanced=True)
    max_grad_norm: float = setting(1.0, "Clip gradients to this norm (0: off).", min=0.0, max=1000.0, advanced=True)
    gradient_accumulation: int = setting(1, "Micro-batches per optimizer step.", min=1, max=1024, advanced=True)

    # -- precision and memory ---------------------------------------------------------------------------
    device: str = setting("auto", "Device: auto (cuda > mps > cpu), cuda, cpu.", choices=("auto", "cuda", "mps", "cpu"),
                          advanced=True)
    precision: str = setting("auto", "Mixed precision: auto (bf16/fp16 on GPU, fp32 on CPU), fp32, fp16, bf16. "
                             "Trainable weights stay fp32.", choices=("auto", "fp32", "fp16", "bf16"), advanced=True)
    gradient_checkpointing: bool = setting(False, "Trade speed for memory (recompute activations).", advanced=True)
    attention: str = setting("auto", "Attention kernel: auto (xformers on CUDA when installed, else SDPA), sdpa, "
                             "xformers, or one SDPA backend (sdpa_flash, sdpa_efficient, sdpa_cudnn, sdpa_math).",
                             choices=("auto", "sdpa", "xformers", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn",
                                      "sdpa_math"), advanced=True)

    # -- speed (train/speed.py; none changes the maths, each measured by `sdstudio bench train --speed`) ----
    compile_unet: bool = setting(False, "Compile the UNet with torch.compile (the first steps are slow while it "
                                 "compiles).", advanced=True, label="Compile the UNet")
    channels_last: bool = setting(False, "Channels-last memory layout for the UNet's convolutions.", advanced=True,
                                  label="Channels-last layout")
    cudnn_benchmark: bool = setting(False, "Let cuDNN time its convolution algorithms on the first step of each "
                                    "image size.", advanced=True, label="cuDNN benchmark")
    fused_optimizer: bool = setting(True, "AdamW as one fused kernel over every tensor instead of a loop.",
                                    advanced=True, label="Fused AdamW")
    cache_on_gpu: bool = setting(False, "Keep cached latents in GPU memory rather than in RAM.", advanced=True,
                                 label="Latent cache on the GPU")

    # -- loss and noise ---------------------------------------------------------------------------------
    prediction_type: str = setting("auto", "What the UNet predicts: auto (the model's), epsilon, v_prediction.",
                                   choices=("auto", "epsilon", "v_prediction"), advanced=True)
    min_snr_gamma: float = setting(0.0, "Min-SNR loss weighting gamma (5 is typical; 0: off).", min=0.0, max=100.0,
                                   advanced=True)
    noise_offset: float = setting(0.0, "Noise offset (0.05-0.1 helps very dark/bright images; 0: off).", min=0.0,
                                  max=1.0, advanced=True)
    ema: bool = setting(False, "Keep an exponential moving average of the trained weights and save it.",
                        advanced=True)
    ema_decay: float = setting(0.999, "EMA decay per step.", min=0.0, max=1.0, advanced=True)

    # -- data -------------------------------------------------------------------------------------------
    caption_dropout: float = setting(0.0, "Probability of training an image with an empty caption.", min=0.0,
                                     max=1.0, advanced=True)
    shuffle_captions: bool = setting(False, "Shuffle comma-separated tags each time (after keep_tokens).",
                                     advanced=True)
    keep_tokens: int = setting(1, "Leading comma-separated tags that never move or drop (the trigger).", min=0,
                               max=100, advanced=True)
    buckets: bool = setting(True, "Aspect-ratio buckets: train non-square images without cropping them square.",
                            advanced=True)
    flip: bool = setting(False, "Random horizontal flips (off with the latent cache).", advanced=True)
    random_crop: bool = setting(False, "Cut each image from a random place in its bucket each time instead of the "
                                "centre (off with the latent cache); SDXL is told where the crop is.", advanced=True)
    masked_loss: bool = setting(False, "Learn only inside masks: a white-on-black <image>.mask.png beside an image "
                                "(black is ignored); images without one count everywhere.", advanced=True)
    cache_latents: str = setting("memory", "Encode images once: memory, disk (in the run folder), or off.",
                                 choices=("off", "memory", "disk"), advanced=True)
    cache_text: bool = setting(True, "Encode captions once when the text encoder is frozen.", advanced=True)
    prior_preservation: bool = setting(False, "Prior preservation with class images (DreamBooth).",
                                       advanced=True)
    class_data: str = setting("", "Class-image folder (empty: the dataset's reg/ folder).", advanced=True)
    prior_loss_weight: float = setting(1.0, "Weight of the class-image loss.", min=0.0, max=10.0, advanced=True)

    # -- outputs and previews ---------------------------------------------------------------------------
    keep_checkpoints: int = setting(3, "Keep the last K checkpoints.", min=1, max=1000, advanced=True)
    sample_steps: int = setting(20, "Denoising steps for previews.", min=1, max=150, advanced=True)
    sample_guidance: float = setting(7.0, "CFG scale for previews.", min=0.0, max=30.0, advanced=True)
    sample_seed: int = setting(1234, "Seed of the first preview (the next prompts use +1, +2...).", min=0,
                               max=2**31 - 1, advanced=True)
    sample_conditions: list = setting([], "Control images for the previews of ControlNet/T2I-Adapter runs, one per "
                                      "prompt (the last repeats); empty: the dataset's first control images.",
                                      advanced=True)
    schema_version: int = setting(SCHEMA_VERSION, "Config format version.", min=1, max=SCHEMA_VERSION,
                                  advanced=True)

    # The method's own table (its Config dataclass instance); filled by resolve().
    options: Any = field(default=None, repr=False, metadata={"internal": True})

    # -- derived ----------------------------------------------------------------------------------------
    def run_dir(self, home: Path | None = None) -> Path:
        if self.output_dir:
            return Path(self.output_dir).expanduser()
        from ..workspace import default_home, safe_name

        return Path(home or default_home()) / "runs" / safe_name(self.output_name)

    def to_dict(self) -> dict:
        """Plain data for config.toml (the method table included)."""
        out = {f.name: getattr(self, f.name) for f in user_fields(TrainConfig)}
        if self.options is not None:
            out[self.method] = {f.name: getattr(self.options, f.name) for f in user_fields(type(self.options))}
        return out

    def to_toml(self, root: Path | None = None) -> str:
        """The config as TOML. With `root` (the workspace a run lives in), paths inside it are written relative
        to it, so a run's config.toml never holds this machine's folders; `load_config` reads them back."""
        import tomli_w

        data = self.to_dict()
        if root is not None:
            for key in PATH_KEYS:
                value = str(data.get(key) or "")
                if value and Path(value).is_absolute():
                    try:
                        data[key] = Path(value).resolve().relative_to(Path(root).resolve()).as_posix()
                    except ValueError:
                        pass  # outside the workspace (the CLI allows it): kept as given
        return tomli_w.dumps(data)


# -- parsing and validation -----------------------------------------------------------------------------

def resolve(values: dict) -> TrainConfig:
    """A validated TrainConfig (with its method table) from plain data (a merged preset + --set)."""
    from ..methods.registry import all_methods, get_method

    values = dict(values)
    version = values.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise UserError(f"This config has schema_version {version}, newer than this SD Studio understands "
                        f"({SCHEMA_VERSION}): update SD Studio.")
    methods = all_methods()
    tables = {k: values.pop(k) for k in list(values) if isinstance(values[k], dict)}
    # The method's own defaults for shared settings (e.g. EDLoRA: no gradient clipping) sit under what was given.
    method_name = values.get("method", TrainConfig.__dataclass_fields__["method"].default)
    if isinstance(method_name, str):
        values = {**getattr(get_method(method_name), "run_defaults", {}), **values}
    cfg = build_dataclass(TrainConfig, values)
    method_cls = get_method(cfg.method)
    for name in tables:
        if name not in methods:  # a table for another registered method is harmless (a switched preset)
            raise _unknown(name, [f.name for f in user_fields(TrainConfig)] + list(methods), " (a table)")
    table = tables.get(cfg.method, {})
    cfg.options = build_dataclass(method_cls.Config, table, where=f" in [{cfg.method}]", prefix=f"{cfg.method}.")
    if cfg.resolution % 64:
        raise UserError(f"resolution = {cfg.resolution} is not a multiple of 64: use "
                        f"{max(64, round(cfg.resolution / 64) * 64)}.")
    if not cfg.output_name.strip():
        raise UserError("output_name is empty: give the run a name.")
    from ..workspace import check_name

    # It names the run folder and the files the method writes inside it: a name, never a path.
    cfg.output_name = check_name(cfg.output_name, "output_name")
    return cfg


def read_toml(path: Path | str) -> dict:
    import tomllib

    p = Path(path)
    if not p.is_file():
        preset = PRESETS_DIR / f"{p.stem}.toml"
        if not p.suffix and preset.is_file():
            p = preset
        else:
            raise UserError(f"{path} does not exist: give a config .toml file or a preset name "
                            f"({', '.join(list_presets()) or 'none found'}).")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{p.name} is not valid TOML ({exc}): fix that line.") from None
    except UnicodeDecodeError:
        raise UserError(f"{p.name} is not a text file (it is not UTF-8): give a config .toml.") from None


def run_workspace(config_path: Path | str) -> Path | None:
    """The workspace of a run's own config.toml (`<workspace>/runs/<name>/config.toml`), else None."""
    p = Path(config_path)
    if p.name == "config.toml" and p.parent.parent.name == "runs":
        return p.resolve().parent.parent.parent
    return None


def workspace_paths(values: dict, root: Path | None) -> dict:
    """A run's config values with its workspace-relative paths made absolute again (those that exist there)."""
    if root is None:
        return values
    values = dict(values)
    for key in PATH_KEYS:
        value = values.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute() and (Path(root) / value).exists():
            values[key] = str(Path(root) / value)
    return values


def load_config(path: Path | str | None = None, sets: list[str] | None = None, extra: dict | None = None
                ) -> TrainConfig:
    """Defaults <- the preset/config file <- `extra` (the UI form) <- `--set` overrides. A run's own config.toml
    holds workspace-relative paths; they are read relative to that workspace."""
    values = workspace_paths(read_toml(path), run_workspace(path)) if path else {}
    values = merge(values, extra or {})
    return resolve(merge(values, parse_sets(sets)))


def apply_places(cfg: TrainConfig, places) -> TrainConfig:
    """The one rule for what a user typed (models/refs.py), applied to a config in place: the dataset, the
    class-image folder and output_dir by the path rule (the workspace, then the current folder), base_model by
    the model-reference rule. A hub id stays an id (the run downloads it, with progress); everything else
    becomes an absolute path, so the run's config.toml means the same thing from any folder."""
    if str(cfg.dataset).strip():
        cfg.dataset = str(places.path(cfg.dataset, what="dataset folder"))
    if str(cfg.class_data).strip():
        cfg.class_data = str(places.path(cfg.class_data, what="class-image folder"))
    if str(cfg.output_dir).strip():
        cfg.output_dir = str(places.output(cfg.output_dir))
    cfg.base_model = places.model(cfg.base_model).ref
    return cfg


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml")) if PRESETS_DIR.is_dir() else []


def preset_header(name: str) -> str:
    """The comment block at the top of a preset: what it is for, VRAM, time per 1,000 steps."""
    p = PRESETS_DIR / f"{name}.toml"
    lines = []
    for line in p.read_text(encoding="utf-8").splitlines() if p.is_file() else []:
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").rstrip())
    return "\n".join(lines)
