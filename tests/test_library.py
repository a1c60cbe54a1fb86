"""The Library finds models by what their tensors say, not by their file names."""
from __future__ import annotations

import shutil

import torch

from sdstudio.formats.kinds import detect_kind, detect_kind_from_keys, kohya_names_for, kohya_te_name
from sdstudio.formats.safe_io import save_safetensors
from sdstudio.library import scan_models, scan_runs

T = torch.zeros(2, 2)


def test_kinds_from_keys():
    assert detect_kind_from_keys(["lora_unet_a.lora_down.weight", "lora_unet_a.alpha"]) == "lora"
    assert detect_kind_from_keys(["unet.down.lora_A.weight"]) == "lora"
    assert detect_kind_from_keys(["lora_unet_a.hada_w1_a", "lora_unet_a.alpha"]) == "lycoris"
    assert detect_kind_from_keys(["lora_unet_a.lokr_w1", "lora_unet_a.alpha"]) == "lycoris"
    assert detect_kind_from_keys(["emb_params"]) == "embedding"
    assert detect_kind_from_keys(["<sks>"]) == "embedding"
    assert detect_kind_from_keys(["clip_l", "clip_g"]) == "embedding"
    assert detect_kind_from_keys(["model.diffusion_model.out.0.weight"]) == "checkpoint"
    assert detect_kind_from_keys(["something.else"]) == "unknown"


def test_kohya_names_match_a1111(tiny_components):
    names = kohya_names_for(tiny_components.unet, "unet")
    assert names["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == \
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    te = kohya_names_for(tiny_components.text_encoder, "te")
    # transformers 5 has no .text_model level, but the file format keeps the segment
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in te
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2" in te
    assert kohya_te_name("encoder.layers.0.mlp.fc1", index=1, xl=True) == "lora_te2_text_model_encoder_layers_0_mlp_fc1"


def test_scan_models_by_content(workspace, tiny_dir):
    m = workspace.root / "models"
    # a LoRA saved with a misleading name and in the wrong folder is still a LoRA
    save_safetensors({"lora_unet_x.lora_down.weight": T, "lora_unet_x.lora_up.weight": T}, m / "embeddings" / "not-an-embedding.safetensors",
                     {"ss_network_dim": "4", "ss_base_model_version": "sd_v1"})
    save_safetensors({"lora_unet_x.hada_w1_a": T}, m / "lora" / "loha.safetensors")
    save_safetensors({"emb_params": T}, m / "embeddings" / "sks.safetensors")
    shutil.copytree(tiny_dir, m / "checkpoints" / "tiny")
    (m / "controlnet" / "canny").mkdir()
    (m / "controlnet" / "canny" / "config.json").write_text('{"_class_name": "ControlNetModel"}')
    (m / "t2i_adapter" / "sketch").mkdir()
    (m / "t2i_adapter" / "sketch" / "config.json").write_text('{"_class_name": "T2IAdapter"}')
    kinds = {e.name: (e.kind, e.family) for e in scan_models(workspace)}
    assert kinds == {
        "not-an-embedding": ("lora", "sd1"), "loha": ("lycoris", ""), "sks": ("embedding", ""),
        "tiny": ("checkpoint", "sd1"), "canny": ("controlnet", ""), "sketch": ("t2i_adapter", ""),
    }
    assert detect_kind(m / "checkpoints" / "tiny" / "unet") == "unknown"  # a part, not a model


def test_scan_runs(workspace):
    run = workspace.root / "runs" / "r1"
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    (run / "config.toml").write_text('method = "lora"\n')
    (run / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n')
    [entry] = scan_runs(workspace)
    assert (entry.method, entry.steps, entry.last_loss, entry.checkpoints) == ("lora", 2, 0.25, 1)
