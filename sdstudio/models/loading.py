"""load_base(ref) -> Components: the one way a base model gets into memory.

ref is one of:
- "tiny" / "tiny-sdxl": the built-in offline models, SD 1.5's and SDXL's layouts (models/tiny.py);
- a local diffusers folder (has model_index.json);
- a single-file original-layout checkpoint (.safetensors; .ckpt only with allow_pickle) of SD1.x, SD2.x or SDXL,
  which loads with no network because we write the family's configs locally;
- any other reference by the one rule of models/refs.py (a model in the workspace by name, a hub id such as
  "stable-diffusion-v1-5/stable-diffusion-v1-5", downloaded into the workspace by models/hub.py when online).
Callers that show progress (training, the Playground) resolve and download first, then pass the local path.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .families import ModelFamily, detect_family_from_keys, detect_family_from_unet_config, get_family

from .refs import TINY, TINY_REFS, TINY_SDXL  # noqa: F401  (the built-in tiny models' refs)


@dataclass
class Components:
    """A loaded base model, split into the parts trainers and pipelines need."""

    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    scheduler: Any
    family: ModelFamily
    ref: str  # what the user asked for
    source: Path | None = None  # the diffusers folder (or single file) it came from
    dtype: Any = None
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    @property
    def resolution(self) -> int:
        """The native image size in pixels (512 for SD 1.5, 768 for SD 2.x, 1024 for SDXL, 64 for tiny), from
        the UNet's sample size and the VAE's scale factor rather than from the family's nominal value."""
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return int(self.unet.config.sample_size) * scale

    @property
    def text_encoder(self):
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    def to(self, device: str | None = None, dtype=None) -> "Components":
        for m in (self.unet, self.vae, *self.text_encoders):
            if (device and str(m.device) != str(device)) or (dtype and m.dtype != dtype):
                m.to(device=device, dtype=dtype)
        self.device = device or self.device
        self.dtype = dtype or self.dtype
        return self

    def pipeline(self, scheduler=None):
        """A diffusers pipeline over these very modules (no copy): what previews and the Playground use."""
        import diffusers

        cls = getattr(diffusers, self.family.pipeline_class)
        kwargs = dict(unet=self.unet, vae=self.vae, scheduler=scheduler or self.scheduler)
        if self.family.is_xl:
            kwargs.update(text_encoder=self.text_encoders[0], text_encoder_2=self.text_encoders[1],
                          tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1])
        else:
            kwargs.update(text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0], safety_checker=None,
                          feature_extractor=None, requires_safety_checker=False)
        pipe = cls(**kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _components_from_pipe(pipe, family: ModelFamily, ref: str, source: Path | None) -> Components:
    tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) is not None else [])
    toks = [pipe.tokenizer] + ([pipe.tokenizer_2] if getattr(pipe, "tokenizer_2", None) is not None else [])
    for m in (pipe.unet, pipe.vae, *tes):
        m.requires_grad_(False)
        m.eval()
    return Components(unet=pipe.unet, vae=pipe.vae, text_encoders=tes, tokenizers=toks, scheduler=pipe.scheduler,
                      family=family, ref=ref, source=source, dtype=pipe.unet.dtype)


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


def looks_like_hub_id(ref: str) -> bool:
    from .refs import parse_hub_id

    return parse_hub_id(ref) is not None and not Path(ref).exists()


def family_of_folder(folder: Path) -> ModelFamily:
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    return detect_family_from_unet_config(cfg)


def family_config_dir(family: ModelFamily, prediction_type: str | None = None) -> Path:
    """A local diffusers config folder (no weights) for `family`, so `from_single_file` needs no network.
    Written once into the cache; the tokenizer comes from open_clip's bundled BPE file."""
    import diffusers

    from .tiny import write_tokenizer

    pred = prediction_type or family.prediction_type
    root = Path(os.environ.get("SDSTUDIO_CACHE", Path.home() / ".cache" / "sdstudio"))
    folder = root / f"configs-d{diffusers.__version__}" / f"{family.name}-{pred}"
    from ..formats.safe_io import build_once

    with build_once(folder, "model_index.json") as tmp:
        if tmp is None:
            return folder
        index = {"_class_name": family.pipeline_class, "_diffusers_version": diffusers.__version__,
                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                 "scheduler": ["diffusers", family.scheduler[0]]}
        (tmp / "unet").mkdir()
        (tmp / "unet" / "config.json").write_text(json.dumps(dict(family.unet, _class_name="UNet2DConditionModel")))
        (tmp / "vae").mkdir()
        (tmp / "vae" / "config.json").write_text(json.dumps(dict(family.vae, _class_name="AutoencoderKL")))
        (tmp / "scheduler").mkdir()
        sched = dict(family.scheduler[1], _class_name=family.scheduler[0], prediction_type=pred)
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
        for i, (cls, cfg, pad) in enumerate(family.text):
            suffix = "" if i == 0 else f"_{i + 1}"
            (tmp / f"text_encoder{suffix}").mkdir()
            arch = dict(cfg, architectures=[cls], model_type="clip_text_model")
            (tmp / f"text_encoder{suffix}" / "config.json").write_text(json.dumps(arch))
            write_tokenizer(tmp / f"tokenizer{suffix}", pad_token=pad)
            index[f"text_encoder{suffix}"] = ["transformers", cls]
            index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
        if not family.is_xl:
            index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        (tmp / "model_index.json").write_text(json.dumps(index))
    return folder


def load_base(ref: str | Path, *, dtype=None, device: str = "cpu", allow_pickle: bool = False,
              prediction_type: str | None = None, config_dir: str | Path | None = None,
              benchmark: bool = False) -> Components:
    """Load a base model from any of the refs users have. Every user mistake is one UserError sentence.
    `benchmark`: the caller is a benchmark, which alone may load a full-size random model (models/full.py)."""
    import torch

    _quiet_if_asked()
    dtype = dtype or torch.float32
    ref_s = str(ref).strip()
    if not ref_s:
        raise UserError("No base model chosen: pick one, or use 'tiny' for the offline demo model.")

    if ref_s in TINY_REFS:
        from .tiny import tiny_model_dir

        comps = _load_folder(tiny_model_dir(TINY_REFS[ref_s]), ref_s, dtype)
    else:
        path = Path(ref_s).expanduser()
        if not (path.is_absolute() and path.exists()):
            # Anything but an existing absolute path goes through the one rule (workspace, then the current
            # folder, then models by name, then a hub id, downloaded into the workspace).
            from .refs import Places

            local = Places.cli().local_model(ref_s, half=dtype in (torch.float16, torch.bfloat16))
            path = Path(local)
        if is_diffusers_folder(path):
            from .full import refuse_unless_benchmark

            refuse_unless_benchmark(path, benchmark)
            comps = _load_folder(path, ref_s, dtype)
        elif path.is_dir():
            raise UserError(f"{ref_s} is a folder but not a diffusers model (no model_index.json): point at the "
                            f"model's top folder, or at a single .safetensors checkpoint.")
        else:
            comps = _load_single_file(path, ref_s, dtype, allow_pickle, prediction_type, config_dir)
    if prediction_type and comps.scheduler.config.get("prediction_type") != prediction_type:
        comps.scheduler = comps.scheduler.__class__.from_config(comps.scheduler.config,
                                                                prediction_type=prediction_type)
    return comps.to(device=device)


def _quiet_if_asked() -> None:
    """The CLI asks for quiet progress bars (SDSTUDIO_QUIET=1); applied here, where diffusers is imported anyway."""
    if os.environ.get("SDSTUDIO_QUIET") == "1":
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()


def _load_folder(folder: Path, ref: str, dtype) -> Components:
    import diffusers

    try:
        index = json.loads((folder / "model_index.json").read_text())
        family = family_of_folder(folder)
        cls = getattr(diffusers, index.get("_class_name", family.pipeline_class), None) or getattr(
            diffusers, family.pipeline_class)
        kwargs = {} if family.is_xl else dict(safety_checker=None, requires_safety_checker=False)
        unet_files = [p.name for p in (folder / "unet").iterdir()] if (folder / "unet").is_dir() else []
        if not any(n.endswith(".safetensors") and ".fp16" not in n for n in unet_files) and \
                any(".fp16." in n for n in unet_files):
            kwargs["variant"] = "fp16"  # a folder downloaded elsewhere with only the fp16 weights
        pipe = cls.from_pretrained(str(folder), dtype=dtype, local_files_only=True, **kwargs)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise UserError(f"The diffusers folder {folder} could not be loaded ({str(exc).splitlines()[0]}): "
                        f"is it complete?") from exc
    return _components_from_pipe(pipe, family, ref, folder)


def _load_single_file(path: Path, ref: str, dtype, allow_pickle: bool, prediction_type, config_dir) -> Components:
    import diffusers

    from ..formats.safe_io import load_state_dict

    if path.suffix != ".safetensors" and not allow_pickle:
        load_state_dict(path)  # raises the standard "pickle refused" message
    sd = load_state_dict(path, allow_pickle=allow_pickle)
    family = detect_family_from_keys(sd.keys())
    if config_dir:
        config = Path(config_dir)
    elif _is_tiny_checkpoint(sd):
        from .tiny import tiny_model_dir

        config = tiny_model_dir("sdxl" if family.is_xl else "sd1")
    else:
        config = family_config_dir(family, prediction_type)
    cls = getattr(diffusers, family.pipeline_class)
    kwargs = {} if family.is_xl else dict(safety_checker=None, requires_safety_checker=False)
    if path.suffix != ".safetensors":
        # diffusers would re-read a pickle without weights_only: hand it a safetensors copy instead.
        import tempfile

        from ..formats.safe_io import save_safetensors

        tmpdir = tempfile.mkdtemp(prefix="sdstudio-ckpt-")
        path = save_safetensors({k: v for k, v in sd.items() if hasattr(v, "shape")}, Path(tmpdir) / "model.safetensors")
    del sd
    try:
        pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True, dtype=dtype, **kwargs)
    except Exception as exc:
        raise UserError(f"{path.name} looks like {family.label} but did not load ({str(exc).splitlines()[0]}): "
                        f"the file may be truncated or of another architecture.") from exc
    return _components_from_pipe(pipe, family, ref, path)


def _is_tiny_checkpoint(sd: dict) -> bool:
    """A built-in tiny model exported as a single file (its conv_in is 32 wide, a real SD's or SDXL's is 320)."""
    w = sd.get("model.diffusion_model.input_blocks.0.0.weight")
    return w is not None and w.shape[0] == 32


def family_of_ref(ref: str) -> ModelFamily:
    """The family of a ref without loading weights where possible (a hub id: the catalog's word for it)."""
    if ref in TINY_REFS:
        return get_family(TINY_REFS[ref])
    from .catalog import by_source
    from .refs import parse_hub_id

    hub = parse_hub_id(ref)
    entry = by_source(hub.repo) if hub and not Path(ref).exists() else None
    if entry is not None and entry.family:
        return get_family(entry.family)
    path = Path(ref)
    if is_diffusers_folder(path):
        return family_of_folder(path)
    if path.suffix == ".safetensors" and path.is_file():
        from ..formats.safe_io import read_safetensors_keys

        return detect_family_from_keys(read_safetensors_keys(path))
    return get_family("sd1")
