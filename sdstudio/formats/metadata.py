"""Metadata written into trained files: kohya's ss_* keys, modelspec.* keys, and our run card.

A1111's and ComfyUI's model browsers, civitai and kohya's own tools read ss_*; modelspec.* is the Stability
AI model-spec standard; `sdstudio.run_card` is the resolved config as JSON, so a file says how it was made.
All values are strings (safetensors metadata is str -> str).

The ss_* keys, their value types and the modelspec.* values follow what kohya-ss/sd-scripts writes, read from
train_network.py, library/train_util.py and library/sai_model_spec.py at commit
48d368fa557731ad0488c07304dfeba8c07910eb (tests/test_train_metadata.py holds the list it compares against).
Values are `str(value)` as sd-scripts makes them: True/False, None for an unset option, JSON for tables. We
write a key only for something we do; a feature we lack is written as sd-scripts writes it when off.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path, PureWindowsPath

SD_SCRIPTS_COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"

# library/sai_model_spec.py: architecture ids and implementations
ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}
ARCH_SD2_V = "stable-diffusion-v2-768-v"
IMPL_DIFFUSERS = "diffusers"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
ADAPTER_KINDS = {"lora": "lora", "lycoris": "lora", "edlora": "lora", "textual-inversion": "textual-inversion",
                 "controlnet": "controlnet", "gligen": "gligen"}  # the model spec's architecture suffix
# ("stable-diffusion-v1/controlnet")

# The optimizer classes train/optim.py builds, by setting (sd-scripts writes module + "." + class name).
OPTIMIZER_CLASSES = {"adamw": "torch.optim.adamw.AdamW", "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit",
                     "prodigy": "prodigyopt.prodigy.Prodigy", "adafactor": "transformers.optimization.Adafactor",
                     "lion": "lion_pytorch.lion_pytorch.Lion"}


def _s(v) -> str:
    return str(v)


def base_model_version(family) -> str:
    """sd-scripts' ss_base_model_version (model_util.get_model_version_str_for_sd1_sd2; SDXL's constant)."""
    if family.name == "sdxl":
        return "sdxl_base_v1-0"
    return ("sd_v2" if family.name == "sd2" else "sd_v1") + ("_v" if family.prediction_type == "v_prediction" else "")


def base_model_fields(ref: str) -> dict[str, str]:
    """ss_sd_model_name (the file or folder name only, never the user's folder layout; a hub id as it is) and,
    for a single-file checkpoint, the two hashes A1111 gives it (ss_sd_model_hash, ss_new_sd_model_hash)."""
    ref = str(ref)
    p = Path(ref).expanduser()
    if not p.exists():
        return {"ss_sd_model_name": ref}
    out = {"ss_sd_model_name": p.name}
    if p.is_file():
        with open(p, "rb") as f:
            f.seek(0x100000)
            out["ss_sd_model_hash"] = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]  # A1111's old model hash
        out["ss_new_sd_model_hash"] = file_sha256(p)
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bucket_info(data) -> dict | None:
    """sd-scripts' ss_bucket_info from a TrainDataset: {"buckets": {i: {"resolution": [w, h], "count": n}},
    "mean_img_ar_error": e}, counts with repeats; None without buckets."""
    if not getattr(data.cfg, "buckets", False):
        return None
    counts: dict[tuple[int, int], int] = {}
    errors = []
    for i in data.instance_idx:
        it = data.items[i]
        counts[it.bucket] = counts.get(it.bucket, 0) + 1
    for it in data.items:
        if not it.is_class:
            errors.append(abs(it.size[0] / it.size[1] - it.bucket[0] / it.bucket[1]))
    buckets = {str(i): {"resolution": list(reso), "count": n} for i, (reso, n) in enumerate(sorted(counts.items()))}
    return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}


def training_metadata(run, family, *, network_dim: int | None = None, network_alpha: float | None = None,
                      network_module: str = "networks.lora", network_args: dict | None = None,
                      kind: str = "lora", title: str = "", unet_lr: float | None = None,
                      text_encoder_lr: float | None = None, network_dropout: float | None = None,
                      clip_skip: int | None = None) -> dict[str, str]:
    """ss_* + modelspec.* + run card for an artefact of `run` (a methods.base.RunInfo).

    `kind`: "lora", "lycoris", "edlora", "textual-inversion", or a checkpoint kind ("full", "dreambooth").
    `unet_lr` / `text_encoder_lr`: the learning rates those parts trained at (None: the part did not train at a
    rate of its own). `network_args`: sd-scripts' --network_args as a table (string values, e.g. LoCon's
    {"conv_dim": "8", "conv_alpha": "4"}); LyCORIS files add their "algo"."""
    cfg = run.cfg
    layout = run.layout
    now = time.time()
    started = run.started or now
    grad_acc = int(cfg.gradient_accumulation)
    batches = int(getattr(run, "batches_per_epoch", 0) or 0)
    updates_per_epoch = math.ceil(batches / grad_acc) if batches else 0
    epochs = math.ceil(cfg.max_steps / updates_per_epoch) if updates_per_epoch else 1
    epoch = min(epochs, math.ceil(run.step / updates_per_epoch)) if updates_per_epoch else 1
    concepts = layout.concepts if layout else []
    reg = layout.class_concepts if layout else []
    meta = {
        # train_network.py's metadata table, in its order
        "ss_session_id": _s(int(hashlib.sha256(f"{run.run_dir}|{started}".encode()).hexdigest()[:8], 16)),
        "ss_training_started_at": _s(started),
        "ss_output_name": cfg.output_name,
        "ss_learning_rate": _s(cfg.learning_rate),
        "ss_text_encoder_lr": _s(text_encoder_lr),
        "ss_unet_lr": _s(unet_lr),
        "ss_num_train_images": _s(sum(len(c.images) * c.repeats for c in concepts)),
        "ss_num_validation_images": "0",
        "ss_num_reg_images": _s(sum(len(c.images) * c.repeats for c in reg)),
        "ss_num_batches_per_epoch": _s(batches),
        "ss_num_epochs": _s(epochs),
        "ss_gradient_checkpointing": _s(bool(cfg.gradient_checkpointing)),
        "ss_gradient_accumulation_steps": _s(grad_acc),
        "ss_max_train_steps": _s(cfg.max_steps),
        "ss_lr_warmup_steps": _s(cfg.warmup_steps),
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_mixed_precision": getattr(run, "mixed_precision", "") or "no",
        "ss_full_fp16": "False",
        "ss_v2": _s(family.name == "sd2"),
        "ss_base_model_version": base_model_version(family),
        "ss_clip_skip": _s(clip_skip if clip_skip and clip_skip > 1 else None),
        "ss_max_token_length": "None",  # 75 tokens, sd-scripts' default
        "ss_cache_latents": _s(cfg.cache_latents != "off"),
        "ss_seed": _s(cfg.seed),
        "ss_lowram": "False",
        "ss_noise_offset": _s(cfg.noise_offset or None),
        "ss_multires_noise_iterations": "None",
        "ss_multires_noise_discount": "None",
        "ss_adaptive_noise_scale": "None",
        "ss_zero_terminal_snr": "False",
        "ss_training_comment": "None",
        "ss_optimizer": getattr(run, "optimizer", "") or OPTIMIZER_CLASSES.get(cfg.optimizer, cfg.optimizer),
        "ss_max_grad_norm": _s(float(cfg.max_grad_norm)),
        "ss_caption_dropout_rate": _s(float(cfg.caption_dropout)),
        "ss_caption_dropout_every_n_epochs": "0",
        "ss_caption_tag_dropout_rate": "0.0",
        "ss_face_crop_aug_range": "None",
        "ss_prior_loss_weight": _s(float(cfg.prior_loss_weight)),
        "ss_min_snr_gamma": _s(cfg.min_snr_gamma or None),
        "ss_scale_weight_norms": "None",
        "ss_ip_noise_gamma": "None",
        "ss_debiased_estimation": "False",
        "ss_noise_offset_random_strength": "False",
        "ss_ip_noise_gamma_random_strength": "False",
        "ss_loss_type": "l2",
        "ss_huber_schedule": "snr",  # sd-scripts' defaults, unused with the l2 loss
        "ss_huber_scale": "1.0",
        "ss_huber_c": "0.1",
        "ss_fp8_base": "False",
        "ss_fp8_base_unet": "False",
        "ss_validation_seed": "None",
        "ss_validation_split": "0.0",
        "ss_max_validation_steps": "None",
        "ss_validate_every_n_epochs": "None",
        "ss_validate_every_n_steps": "None",
        "ss_resize_interpolation": "None",
        # the dataset (sd-scripts' folder-dataset branch)
        "ss_batch_size_per_device": _s(cfg.batch_size),
        "ss_total_batch_size": _s(cfg.batch_size * int(getattr(run, "world", 1) or 1) * grad_acc),
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_color_aug": "False",
        "ss_flip_aug": _s(bool(cfg.flip)),
        "ss_random_crop": "False",
        "ss_shuffle_caption": _s(bool(cfg.shuffle_captions)),
        "ss_enable_bucket": _s(bool(cfg.buckets)),
        "ss_bucket_no_upscale": "False",
        "ss_min_bucket_reso": _s(_bucket_reso(run, min, cfg.resolution)),
        "ss_max_bucket_reso": _s(_bucket_reso(run, max, cfg.resolution)),
        "ss_keep_tokens": _s(cfg.keep_tokens),
        "ss_dataset_dirs": json.dumps({c.path.name: {"n_repeats": c.repeats, "img_count": len(c.images)}
                                       for c in concepts}),
        "ss_reg_dataset_dirs": json.dumps({c.path.name: {"n_repeats": c.repeats, "img_count": len(c.images)}
                                           for c in reg}),
        "ss_tag_frequency": json.dumps(run.tag_frequency),
        "ss_bucket_info": json.dumps(getattr(run, "bucket_info", None)),
        # the base model, then what save_model adds
        **base_model_fields(cfg.base_model),
        "ss_training_finished_at": _s(now),
        "ss_steps": _s(run.step),
        "ss_epoch": _s(epoch),
    }
    if network_dim is not None:
        meta["ss_network_module"] = network_module
        meta["ss_network_dim"] = _s(network_dim)
        meta["ss_network_alpha"] = _s(float(network_alpha if network_alpha is not None else network_dim))
        meta["ss_network_dropout"] = _s(network_dropout or None)
        if network_args:
            meta["ss_network_args"] = json.dumps(network_args)
    meta |= {
        **modelspec(cfg, family, kind, title, clip_skip, now),
        "sdstudio.dataset_hash": run.dataset_hash,
        "sdstudio.run_card": json.dumps(_shareable_all(_jsonable(cfg.to_dict())), sort_keys=True),
        "sdstudio.version": _version(),
    }
    return meta


def _bucket_reso(run, pick, resolution: int) -> int:
    info = getattr(run, "bucket_info", None)
    if not info or not info.get("buckets"):
        return resolution
    return pick(v for b in info["buckets"].values() for v in b["resolution"])


def modelspec(cfg, family, kind: str, title: str = "", clip_skip: int | None = None, now: float | None = None
              ) -> dict[str, str]:
    """modelspec.* as sd-scripts' sai_model_spec.build_metadata makes them for this kind of file."""
    now = time.time() if now is None else now
    v_pred = (family.prediction_type if cfg.prediction_type == "auto" else cfg.prediction_type) == "v_prediction"
    arch = ARCH_SD2_V if family.name == "sd2" and v_pred else ARCH.get(family.name, ARCH["sd1"])
    adapter = ADAPTER_KINDS.get(kind)
    if adapter:
        arch += f"/{adapter}"
    # determine_implementation: a LoRA on SD1/2 is "diffusers"; SDXL LoRAs, embeddings and checkpoints are SGM's.
    impl = IMPL_DIFFUSERS if adapter == "lora" and not family.is_xl else IMPL_STABILITY_AI
    meta = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": arch,
        "modelspec.implementation": impl,
        "modelspec.title": title or cfg.output_name,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(int(now))),
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "modelspec.implementation_version": f"sdstudio/{_version()}",
    }
    if clip_skip and clip_skip > 1:
        meta["modelspec.encoder_layer"] = str(clip_skip)
    return meta


# -- the hashes A1111 shows -------------------------------------------------------------------------------

def network_hashes(tensors: dict, metadata: dict[str, str]) -> dict[str, str]:
    """sshs_model_hash and sshs_legacy_hash as sd-scripts precomputes them for a network file
    (train_util.precalculate_safetensors_hashes): the file serialised with only its ss_* metadata, then
    - model hash: sha256 of everything after the header, which is A1111's hash of a LoRA (hashes.sha256 with
      use_addnet_hash) and does not depend on the metadata, so it is the hash of the file we write;
    - legacy hash: sha256 of the 64 KiB at 1 MiB of that ss_*-only serialisation, first 8 hex digits (a file
      cannot hold a hash of its own header)."""
    from safetensors.torch import save

    data = save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(data[8 + n:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}


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
