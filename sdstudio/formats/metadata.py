"""Metadata written into trained files: kohya's ss_* keys, modelspec.* keys, and our run card.

A1111's and ComfyUI's model browsers, civitai and kohya's own tools read ss_*; modelspec.* is the Stability
AI model-spec standard; `sdstudio.run_card` is the resolved config as JSON, so a file says how it was made.
All values are strings (safetensors metadata is str -> str).
"""
from __future__ import annotations

import json
import time
from pathlib import Path, PureWindowsPath

ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v", "sdxl": "stable-diffusion-xl-v1-base"}
SS_BASE = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def training_metadata(run, family, *, network_dim: int | None = None, network_alpha: float | None = None,
                      network_module: str = "networks.lora", network_args: dict | None = None,
                      kind: str = "lora", title: str = "") -> dict[str, str]:
    """ss_* + modelspec.* + run card for an artefact of `run` (a methods.base.RunInfo)."""
    cfg = run.cfg
    layout = run.layout
    arch = ARCH.get(family.name, "stable-diffusion-v1")
    now = int(time.time())
    meta = {
        "ss_session_id": str(abs(hash((run.run_dir, run.started))) % 2**31),
        "ss_training_started_at": str(run.started or now),
        "ss_output_name": cfg.output_name,
        "ss_sd_model_name": shareable(str(cfg.base_model)),
        "ss_base_model_version": SS_BASE.get(family.name, "sd_v1"),
        "ss_v2": str(family.name == "sd2"),
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_steps": str(run.step),
        "ss_max_train_steps": str(cfg.max_steps),
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation),
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": str(cfg.warmup_steps),
        "ss_optimizer": cfg.optimizer,
        "ss_seed": str(cfg.seed),
        "ss_noise_offset": str(cfg.noise_offset),
        "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_caption_dropout_rate": str(cfg.caption_dropout),
        "ss_shuffle_caption": str(cfg.shuffle_captions),
        "ss_keep_tokens": str(cfg.keep_tokens),
        "ss_enable_bucket": str(cfg.buckets),
        "ss_mixed_precision": cfg.precision,
        "ss_prior_loss_weight": str(cfg.prior_loss_weight if cfg.prior_preservation else 0.0),
        "ss_tag_frequency": json.dumps(run.tag_frequency),
        "ss_dataset_dirs": json.dumps({c.path.name: {"n_repeats": c.repeats, "img_count": len(c.images)}
                                       for c in (layout.concepts if layout else [])}),
        "ss_num_train_images": str(sum(len(c.images) * c.repeats for c in layout.concepts) if layout else 0),
        "ss_num_reg_images": str(len(layout.class_images) if layout else 0),
        "ss_dataset_hash": run.dataset_hash,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch + (f"/{kind}" if kind in ("lora", "lycoris", "textual-inversion") else ""),
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": title or cfg.output_name,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)),
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.prediction_type": family.prediction_type if cfg.prediction_type == "auto" else cfg.prediction_type,
        "sdstudio.run_card": json.dumps(_shareable_all(_jsonable(cfg.to_dict())), sort_keys=True),
        "sdstudio.version": _version(),
    }
    if network_dim is not None:
        meta["ss_network_dim"] = str(network_dim)
        meta["ss_network_alpha"] = str(network_alpha if network_alpha is not None else network_dim)
        meta["ss_network_module"] = network_module
        if network_args:
            meta["ss_network_args"] = json.dumps(network_args)
    return meta


# The workspace's top-level folders: a path through one of them is shared from there on.
_WORKSPACE_TOPS = ("models", "datasets", "runs", "outputs", "inputs", "recipes")


def shareable(value: str) -> str:
    """A path as it may travel inside a shared file: never absolute. `/home/me/ws/models/lora/a.safetensors`
    becomes `models/lora/a.safetensors` (workspace-relative), any other absolute path its last part; relative
    paths, hub ids and "tiny" are left as they are."""
    if not isinstance(value, str) or not value:
        return value
    p = Path(value)
    if not (p.is_absolute() or PureWindowsPath(value).is_absolute()):
        return value
    parts = p.parts if p.is_absolute() else PureWindowsPath(value).parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] in _WORKSPACE_TOPS and i < len(parts) - 1:
            return "/".join(parts[i:])
    return parts[-1]


def _shareable_all(d):
    """Every absolute path inside a run card, made shareable."""
    if isinstance(d, dict):
        return {k: _shareable_all(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_shareable_all(v) for v in d]
    return shareable(d) if isinstance(d, str) else d


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    return d if isinstance(d, (str, int, float, bool)) or d is None else str(d)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("sdstudio")
    except Exception:
        return "0"
