"""Our ss_* metadata is the set kohya sd-scripts writes, with its value types, as the tools that read it expect
(civitai, A1111's metadata panel and its LoRA hash, ComfyUI's model browser).

The field list below is taken from kohya-ss/sd-scripts at commit 48d368fa557731ad0488c07304dfeba8c07910eb:
train_network.py (the `metadata` table built before training, the folder-dataset branch's table, the
network-args, model-name and hash keys, and what `save_model` adds), networks/lora.py (`save_weights`: the
sshs_* hashes) and library/train_util.py (`precalculate_safetensors_hashes`, `addnet_hash_*`, `model_hash`).
Types are those of the values sd-scripts stores before its `str(v)`: "int?" means an int or "None".
"""
from __future__ import annotations

import hashlib
import json
import re

import pytest
from concepts_util import torch  # noqa: F401  (one CPU thread)
from train_helpers import fast_sets, make_kohya_dataset

from sdstudio.cli import main
from sdstudio.formats.safe_io import load_state_dict, read_safetensors_metadata

SD_SCRIPTS_COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"

SD_SCRIPTS_FIELDS = {
    # train_network.py: the metadata table
    "ss_session_id": "int", "ss_training_started_at": "float", "ss_output_name": "str",
    "ss_learning_rate": "float", "ss_text_encoder_lr": "float?", "ss_unet_lr": "float?",
    "ss_num_train_images": "int", "ss_num_validation_images": "int", "ss_num_reg_images": "int",
    "ss_num_batches_per_epoch": "int", "ss_num_epochs": "int", "ss_gradient_checkpointing": "bool",
    "ss_gradient_accumulation_steps": "int", "ss_max_train_steps": "int", "ss_lr_warmup_steps": "int",
    "ss_lr_scheduler": "str", "ss_network_module": "str", "ss_network_dim": "int?", "ss_network_alpha": "float?",
    "ss_network_dropout": "float?", "ss_mixed_precision": ("no", "fp16", "bf16"), "ss_full_fp16": "bool",
    "ss_v2": "bool", "ss_base_model_version": ("sd_v1", "sd_v2", "sd_v2_v", "sdxl_base_v1-0"),
    "ss_clip_skip": "int?", "ss_max_token_length": "int?", "ss_cache_latents": "bool", "ss_seed": "int?",
    "ss_lowram": "bool", "ss_noise_offset": "float?", "ss_multires_noise_iterations": "int?",
    "ss_multires_noise_discount": "float?", "ss_adaptive_noise_scale": "float?", "ss_zero_terminal_snr": "bool",
    "ss_training_comment": "str", "ss_sd_scripts_commit_hash": "str", "ss_optimizer": "str",
    "ss_max_grad_norm": "float", "ss_caption_dropout_rate": "float", "ss_caption_dropout_every_n_epochs": "int?",
    "ss_caption_tag_dropout_rate": "float", "ss_face_crop_aug_range": "str", "ss_prior_loss_weight": "float",
    "ss_min_snr_gamma": "float?", "ss_scale_weight_norms": "float?", "ss_ip_noise_gamma": "float?",
    "ss_debiased_estimation": "bool", "ss_noise_offset_random_strength": "bool",
    "ss_ip_noise_gamma_random_strength": "bool", "ss_loss_type": "str", "ss_huber_schedule": "str",
    "ss_huber_scale": "float", "ss_huber_c": "float", "ss_fp8_base": "bool", "ss_fp8_base_unet": "bool",
    "ss_validation_seed": "int?", "ss_validation_split": "float", "ss_max_validation_steps": "int?",
    "ss_validate_every_n_epochs": "int?", "ss_validate_every_n_steps": "int?", "ss_resize_interpolation": "str",
    # the folder-dataset branch (a `--train_data_dir` of N_name folders, which is our dataset layout)
    "ss_batch_size_per_device": "int", "ss_total_batch_size": "int", "ss_resolution": "reso",
    "ss_color_aug": "bool", "ss_flip_aug": "bool", "ss_random_crop": "bool", "ss_shuffle_caption": "bool",
    "ss_enable_bucket": "bool", "ss_bucket_no_upscale": "bool", "ss_min_bucket_reso": "int",
    "ss_max_bucket_reso": "int", "ss_keep_tokens": "int", "ss_dataset_dirs": "json", "ss_reg_dataset_dirs": "json",
    "ss_tag_frequency": "json", "ss_bucket_info": "json",
    "ss_datasets": "json",  # the dataset-config branch instead
    "ss_network_args": "json",
    "ss_sd_model_hash": "hex8", "ss_new_sd_model_hash": "hex64", "ss_sd_model_name": "str",
    "ss_vae_hash": "hex8", "ss_new_vae_hash": "hex64", "ss_vae_name": "str",
    # save_model
    "ss_training_finished_at": "float", "ss_steps": "int", "ss_epoch": "int",
    # networks/lora.py save_weights
    "sshs_model_hash": "hex64", "sshs_legacy_hash": "hex8",
}
# What we leave out, and why.
NOT_OURS = {
    "ss_sd_scripts_commit_hash": "sd-scripts' own git commit; we are not sd-scripts",
    "ss_datasets": "only with a sd-scripts dataset config file; we write the folder branch's keys",
    "ss_vae_hash": "only with a separate --vae; we train with the base model's own VAE",
    "ss_new_vae_hash": "as ss_vae_hash", "ss_vae_name": "as ss_vae_hash",
    "ss_sd_model_hash": "only for a single-file base (test_base_model_name_and_hashes)",
    "ss_new_sd_model_hash": "as ss_sd_model_hash",
}


def _check_type(key: str, value: str, kind) -> None:
    num = r"-?\d+(\.\d*)?([eE][-+]?\d+)?"
    if isinstance(kind, tuple):
        assert value in kind, (key, value)
        return
    if kind.endswith("?") and value == "None":
        return
    kind = kind.rstrip("?")
    ok = {"int": lambda v: re.fullmatch(r"-?\d+", v), "float": lambda v: re.fullmatch(num, v),
          "bool": lambda v: v in ("True", "False"), "str": lambda v: isinstance(v, str),
          "json": lambda v: json.loads(v) is not None or v == "null",
          "reso": lambda v: re.fullmatch(r"\(\d+, \d+\)", v), "hex8": lambda v: re.fullmatch(r"[0-9a-f]{8}", v),
          "hex64": lambda v: re.fullmatch(r"[0-9a-f]{64}", v)}[kind]
    assert ok(value), (key, value, kind)


def _train(tmp_path, preset, extra, steps, name="run"):
    from pathlib import Path

    ds = make_kohya_dataset(tmp_path / "ds", n=2, repeats=3)
    out = tmp_path / "out"
    args = ["--home", str(tmp_path / "ws"), "train", str(Path(__file__).resolve().parent.parent / "presets" /
                                                          f"{preset}.toml")]
    for s in fast_sets(ds, out, max_steps=steps, output_name=name, sample_prompts="[]") + extra:
        args += ["--set", s]
    assert main(args) == 0
    return out


def test_locon_file_metadata_is_sd_scripts_field_set(tmp_path, tiny_dir):
    out = _train(tmp_path, "style-lora-sd15", [f"base_model={tiny_dir}", "lora.targets=locon", "lora.rank=4",
                                                "lora.conv_rank=2", "lora.conv_alpha=1", "learning_rate=3e-4",
                                                "lora.train_text_encoder=true", "lora.text_encoder_lr=5e-5",
                                                "gradient_accumulation=2"], steps=3)
    path = out / "run.safetensors"
    meta = read_safetensors_metadata(path)
    ours = {k for k in meta if k.startswith(("ss_", "sshs_"))}
    assert ours <= set(SD_SCRIPTS_FIELDS), sorted(ours - set(SD_SCRIPTS_FIELDS))
    assert set(SD_SCRIPTS_FIELDS) - ours == set(NOT_OURS), sorted(set(SD_SCRIPTS_FIELDS) - ours)
    for k in ours:
        _check_type(k, meta[k], SD_SCRIPTS_FIELDS[k])

    # The values the issue named, as sd-scripts writes them.
    assert meta["ss_sd_model_name"] == tiny_dir.name  # a file or folder name, never the user's folder layout
    assert not any(str(tmp_path) in v or str(tiny_dir) in v for k, v in meta.items() if k.startswith("ss_"))
    assert meta["ss_unet_lr"] == "0.0003" and meta["ss_text_encoder_lr"] == "5e-05"
    assert meta["ss_mixed_precision"] == "no"  # what the run used: fp32 on this CPU
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW"  # the optimizer's class, module.Class
    assert meta["modelspec.implementation"] == "diffusers"  # sai_model_spec: a LoRA on SD1/2
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}  # no LyCORIS "algo"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_steps"] == "3" and meta["ss_max_train_steps"] == "3"
    assert meta["ss_num_train_images"] == "6" and meta["ss_num_batches_per_epoch"] == "6"  # 2 images x 3 repeats
    assert meta["ss_num_epochs"] == "1" and meta["ss_epoch"] == "1" and meta["ss_total_batch_size"] == "2"
    assert json.loads(meta["ss_bucket_info"])["buckets"]["0"] == {"resolution": [64, 64], "count": 6}

    # The hashes: sshs_model_hash is what A1111 computes for a LoRA file (modules/hashes.py,
    # addnet_hash_safetensors: sha256 after the header), so it shows and matches on civitai without rehashing.
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    # sshs_legacy_hash: sd-scripts' precalculate_safetensors_hashes over the tensors and the ss_* metadata only.
    from safetensors.torch import save

    again = save(load_state_dict(path), metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(again[0x100000:0x110000]).hexdigest()[:8]


def test_plain_lora_has_no_network_args_and_embedding_reports_its_steps(tmp_path):
    out = _train(tmp_path, "object-ti-sd15", ["textual_inversion.token=<sks-obj>"], steps=4)
    meta = read_safetensors_metadata(out / "run.safetensors")
    assert meta["step"] == "4" and meta["ss_steps"] == "4"  # A1111's embedding step: how far it trained
    assert not any(k.startswith(("ss_network", "sshs_")) for k in meta)  # not a network file
    assert {k for k in meta if k.startswith("ss_")} <= set(SD_SCRIPTS_FIELDS)
    # sai_model_spec: an embedding is "textual-inversion", implemented by Stability AI's reference code
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"

    out = _train(tmp_path / "b", "character-lora-sd15", [], steps=1)
    meta = read_safetensors_metadata(out / "run.safetensors")
    assert "ss_network_args" not in meta and meta["ss_text_encoder_lr"] == "None"  # sd-scripts: no --network_args


def test_base_model_name_and_hashes(tmp_path):
    """A single-file base: its name without folders, and the two hashes A1111 gives a checkpoint (the old
    8-digit model hash of the 64 KiB at 1 MiB, and the full sha256)."""
    from sdstudio.formats.metadata import base_model_fields

    f = tmp_path / "models" / "sd15.safetensors"
    f.parent.mkdir()
    data = bytes(range(256)) * 9000
    f.write_bytes(data)
    got = base_model_fields(str(f))
    assert got == {"ss_sd_model_name": "sd15.safetensors",
                   "ss_sd_model_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
                   "ss_new_sd_model_hash": hashlib.sha256(data).hexdigest()}
    assert base_model_fields("runwayml/stable-diffusion-v1-5") == {"ss_sd_model_name": "runwayml/stable-diffusion-v1-5"}
    assert base_model_fields(str(tmp_path / "models")) == {"ss_sd_model_name": "models"}  # a diffusers folder


@pytest.mark.parametrize("family,pred,want", [("sd1", "epsilon", ("sd_v1", "stable-diffusion-v1/lora", "epsilon")),
                                              ("sd2", "v_prediction", ("sd_v2_v", "stable-diffusion-v2-768-v/lora", "v")),
                                              ("sd2", "epsilon", ("sd_v2", "stable-diffusion-v2-512/lora", "epsilon"))])
def test_versions_and_architectures_follow_sd_scripts(family, pred, want):
    from types import SimpleNamespace

    from sdstudio.formats.metadata import base_model_version, modelspec
    from sdstudio.train.config import resolve

    fam = SimpleNamespace(name=family, prediction_type=pred, is_xl=False)
    spec = modelspec(resolve({"method": "lora"}), fam, "lora")
    assert (base_model_version(fam), spec["modelspec.architecture"], spec["modelspec.prediction_type"]) == want
