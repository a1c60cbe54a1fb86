"""The one publisher: artefacts land in models/<kind>/ and bump the workspace's change counter."""
from __future__ import annotations

import json

import torch

from sdstudio.formats.safe_io import save_safetensors
from sdstudio.publish import publish


def test_publish_files_and_folders_by_kind_and_bump_the_change_counter(workspace, tmp_path):
    run = tmp_path / "run"
    lora = save_safetensors({"lora_unet_x.lora_down.weight": torch.zeros(2, 4),
                             "lora_unet_x.lora_up.weight": torch.zeros(4, 2)}, run / "mira.safetensors")
    cn = run / "mira-controlnet"
    cn.mkdir()
    (cn / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    (cn / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    card = run / "notes.txt"
    card.write_text("not a model")

    before = workspace.change_token()
    out = publish(workspace, [lora, cn, card])

    assert out == [workspace.models("lora") / "mira.safetensors", workspace.models("controlnet") / "mira-controlnet"]
    assert (workspace.models("lora") / "mira.safetensors").read_bytes() == lora.read_bytes()
    assert (out[1] / "diffusion_pytorch_model.safetensors").read_bytes() == b"weights"
    assert workspace.change_token() != before
    # Nothing of another kind lands anywhere, and publishing nothing does not bump the counter.
    token = workspace.change_token()
    assert publish(workspace, [card]) == []
    assert workspace.change_token() == token
    # A republished folder replaces the old one whole (no stale files left inside).
    (cn / "diffusion_pytorch_model.safetensors").write_bytes(b"new")
    (workspace.models("controlnet") / "mira-controlnet" / "stale.bin").write_bytes(b"x")
    publish(workspace, [cn])
    assert sorted(p.name for p in out[1].iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
