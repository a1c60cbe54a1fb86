"""formats/kinds.py: what a file is, as typed data (kind, family, format, adapter algorithms), from its header
alone; `detect_kind` keeps answering the kind as a string."""
from __future__ import annotations

import torch

from sdstudio.formats.kinds import ModelInfo, detect_kind, identify
from sdstudio.formats.safe_io import save_safetensors

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def _save(tmp_path, name, sd, meta=None):
    return save_safetensors(sd, tmp_path / f"{name}.safetensors", meta)


def test_adapter_files_by_kind_family_format_and_algorithm(tmp_path):
    z = torch.zeros
    cases = {
        "kohya-sd1": ({f"{Q}.lora_down.weight": z(4, 768), f"{Q}.lora_up.weight": z(320, 4), f"{Q}.alpha": z(())},
                      ModelInfo("lora", "sd1", "kohya", ("lora",))),
        "kohya-sd2": ({f"{Q}.lora_down.weight": z(4, 1024), f"{Q}.lora_up.weight": z(320, 4)},
                      ModelInfo("lora", "sd2", "kohya", ("lora",))),
        "kohya-xl": ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": z(4, 1280),
                      "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": z(5120, 4)},
                     ModelInfo("lora", "sdxl", "kohya", ("lora",))),
        "peft": ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": z(4, 768),
                  "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": z(320, 4)},
                 ModelInfo("lora", "sd1", "peft", ("lora",))),
        "loha": ({f"{Q}.hada_w1_a": z(320, 4), f"{Q}.hada_w1_b": z(4, 1024), f"{Q}.hada_w2_a": z(320, 4),
                  f"{Q}.hada_w2_b": z(4, 1024), f"{Q}.alpha": z(())}, ModelInfo("lycoris", "sd2", "kohya", ("loha",))),
        "lokr-peft": ({"base_model.model.x.to_q.lokr_w1": z(4, 4), "base_model.model.x.to_q.lokr_w2": z(80, 80)},
                      ModelInfo("lycoris", "", "peft", ("lokr",))),
        "dora": ({f"{Q}.lora_down.weight": z(4, 768), f"{Q}.lora_up.weight": z(320, 4), f"{Q}.dora_scale": z(320, 1)},
                 ModelInfo("lycoris", "sd1", "kohya", ("lora", "dora"))),
        "embedding-xl": ({"clip_l": z(2, 768), "clip_g": z(2, 1280)}, ModelInfo("embedding", "sdxl", "sdxl")),
        "embedding-sd2": ({"emb_params": z(3, 1024)}, ModelInfo("embedding", "sd2", "a1111")),
        "edlora": ({"new_concept_embedding.<a1>": z(16, 768), f"{Q}.lora_down.weight": z(4, 768),
                    f"{Q}.lora_up.weight": z(320, 4)}, ModelInfo("edlora", "sd1", "sdstudio-edlora", ("lora",))),
        "checkpoint-sd2": ({"model.diffusion_model.out.0.weight": z(4), "cond_stage_model.model.ln_final.weight": z(4)},
                           ModelInfo("checkpoint", "sd2", "ldm")),
        "oft": ({f"{Q}.oft_blocks": z(4, 8, 8), f"{Q}.alpha": z(())}, ModelInfo("lycoris", "", "kohya")),
        "nothing": ({"something.else": z(1)}, ModelInfo("unknown")),
    }
    for name, (sd, want) in cases.items():
        p = _save(tmp_path, name, sd)
        assert identify(p) == want, name
        assert detect_kind(p) == want.kind  # the string API stays
    # Metadata names the family when the tensors cannot (a LoKr's factors hide the widths).
    p = _save(tmp_path, "lokr-meta", {"lora_unet_x.lokr_w1": z(4, 4), "lora_unet_x.lokr_w2": z(80, 80)},
              {"ss_base_model_version": "sdxl_base_v1-0"})
    assert identify(p) == ModelInfo("lycoris", "sdxl", "kohya", ("lokr",))


def test_folders(tmp_path, tiny_dir):
    assert identify(tiny_dir) == ModelInfo("checkpoint", format="diffusers")
    assert identify(tiny_dir / "unet").kind == "unknown"  # a part, not a model
