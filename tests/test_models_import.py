"""Importing single model files (models/importer.py), and the models of other apps given with --models-from:
listed in the pickers, used for generation, never written to."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdstudio.errors import UserError
from sdstudio.library import list_models, scan_models
from sdstudio.models.importer import hashes_known, import_file

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _lora(tiny_components, path: Path, seed: int = 1) -> Path:
    from test_playground_stack import kohya_lora

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya_lora(tiny_components, seed), path)
    return path


def _sdxl_lora(path: Path) -> Path:
    """A LoRA with SDXL's shapes (its attn2 reads 2048-wide text states; two text encoders)."""
    z = torch.zeros
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": z(4, 2048),
               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": z(640, 4),
               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(4.0),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": z(4, 768),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": z(768, 4)}, path)
    return path


def test_import_checks_hashes_and_lists_a_lora(workspace, tiny_components, tmp_path):
    src = _lora(tiny_components, tmp_path / "downloads" / "My Style v2.safetensors")
    data = src.read_bytes()
    token = workspace.change_token()
    r = import_file(workspace, src, base_family="sd1")
    sha = hashlib.sha256(data).hexdigest()
    assert r.path == workspace.root / "models" / "lora" / "My Style v2.safetensors" and r.path.read_bytes() == data
    assert (r.kind, r.family, r.size, r.sha256, r.short_hash, r.note) == ("lora", "sd1", len(data), sha, sha[:10], "")
    assert f"sha256 {sha}" in r.summary() and f"A1111 short hash {sha[:10]}" in r.summary()
    assert hashes_known(workspace) == {"models/lora/My Style v2.safetensors": sha}
    assert workspace.change_token() != token  # published: the other tabs refresh
    assert "models/lora/My Style v2.safetensors" in [m.path for m in list_models(workspace, "lora")]
    again = import_file(workspace, src)
    assert again.path == r.path and "already in the Library" in again.note
    other = import_file(workspace, _lora(tiny_components, tmp_path / "elsewhere" / "My Style v2.safetensors", seed=2))
    assert other.path.name == "My Style v2-2.safetensors"  # a different file of the same name is never replaced
    assert r.path.read_bytes() == data


def test_a_file_for_another_family_is_labelled_not_hidden(workspace, tiny_components, tmp_path):
    from sdstudio.ui.context import AppContext
    from sdstudio.ui.playground_tab import model_choices

    r = import_file(workspace, _sdxl_lora(tmp_path / "xl.safetensors"), base_family="sd1")
    assert r.family == "sdxl" and "made for SDXL, not for the SD 1.x base" in r.note
    emb = tmp_path / "sd2-word.safetensors"
    save_file({"emb_params": torch.zeros(2, 1024)}, emb)
    assert import_file(workspace, emb, base_family="sd1").family == "sd2"
    _lora(tiny_components, tmp_path / "mine.safetensors")
    import_file(workspace, tmp_path / "mine.safetensors", base_family="sd1")
    labels = dict((v, label) for label, v in model_choices(AppContext(workspace=workspace), "lora"))
    assert "not for this base" in labels["models/lora/xl.safetensors"] and "SDXL" in labels["models/lora/xl.safetensors"]
    assert labels["models/lora/mine.safetensors"] == "models/lora/mine.safetensors"


def test_checkpoint_vae_and_controlnet_files_go_to_their_folders(workspace, tiny_components, tmp_path):
    from sdstudio.formats.ldm import pipeline_to_ldm
    from sdstudio.ui.context import AppContext
    from sdstudio.ui.library_tab import base_model_choices

    c = tiny_components
    save_file(pipeline_to_ldm(c.unet, c.vae, c.text_encoder), tmp_path / "tinyckpt.safetensors")
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3), "decoder.conv_in.weight": torch.zeros(4, 4, 3, 3),
               "quant_conv.weight": torch.zeros(8, 8, 1, 1), "post_quant_conv.weight": torch.zeros(4, 4, 1, 1)},
              tmp_path / "vae-ft-mse.safetensors")
    save_file({"control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768),
               "control_model.zero_convs.0.0.weight": torch.zeros(320, 320, 1, 1)}, tmp_path / "cn-canny.safetensors")
    got = {f: import_file(workspace, tmp_path / f) for f in ("tinyckpt.safetensors", "vae-ft-mse.safetensors",
                                                             "cn-canny.safetensors")}
    assert [(r.kind, r.family, r.path.parent.name) for r in got.values()] == [
        ("checkpoint", "sd1", "checkpoints"), ("vae", "", "vae"), ("controlnet", "sd1", "controlnet")]
    assert "models/checkpoints/tinyckpt.safetensors" in [v for _l, v in base_model_choices(AppContext(workspace=workspace))]


def test_bad_files_are_one_sentence_and_nothing_is_written(workspace, tiny_components, tmp_path):
    good = _lora(tiny_components, tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    (tmp_path / "old.ckpt").write_bytes(b"PK pickle")
    (tmp_path / "junk.safetensors").write_bytes(b"this is not a model")
    save_file({"foo.bar": torch.zeros(3)}, tmp_path / "other.safetensors")
    for name, words in [("cut.safetensors", "is cut off"), ("old.ckpt", "is a pickle"),
                        ("junk.safetensors", "not a .safetensors file"), ("other.safetensors", "holds no")]:
        with pytest.raises(UserError, match=words) as e:
            import_file(workspace, tmp_path / name)
        assert "\n" not in str(e.value)
    assert scan_models(workspace) == []


def test_hard_link_import_takes_no_second_copy(workspace, tiny_components):
    src = _lora(tiny_components, workspace.root / "inputs" / "big.safetensors")
    r = import_file(workspace, src, link=True)
    assert os.stat(r.path).st_ino == os.stat(src).st_ino


def test_import_and_download_cli(tmp_path, tiny_components):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    src = _lora(tiny_components, tmp_path / "style.safetensors")
    r = subprocess.run([sys.executable, "-m", "sdstudio", "--home", str(tmp_path / "ws"), "import", str(src)],
                       capture_output=True, text=True, env=env, timeout=120)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (f"models/lora/style.safetensors: LoRA, SD 1.x, {src.stat().st_size / 1e6:,.1f} MB, "
                                f"sha256 {sha}, A1111 short hash {sha[:10]}")
    (tmp_path / "x.ckpt").write_bytes(b"pickle")
    r = subprocess.run([sys.executable, "-m", "sdstudio", "--home", str(tmp_path / "ws"), "import",
                        str(tmp_path / "x.ckpt")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "pickle" in r.stderr
    r = subprocess.run([sys.executable, "-m", "sdstudio", "--home", str(tmp_path / "ws"), "download", "--list"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "stable-diffusion-v1-5/stable-diffusion-v1-5" in r.stdout and "cn-canny" in r.stdout
    r = subprocess.run([sys.executable, "-m", "sdstudio", "--home", str(tmp_path / "ws"), "download", "sd15"],
                       capture_output=True, text=True, env=dict(env, HF_HUB_OFFLINE="1"), timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: Cannot download") \
        and "offline" in r.stderr


# -- --models-from ------------------------------------------------------------------------------------------------

def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def a1111(tmp_path, tiny_components):
    """An A1111 folder: models/Stable-diffusion, models/Lora, embeddings/, models/ControlNet."""
    from diffusers import ControlNetModel

    from sdstudio.formats.ldm import pipeline_to_ldm

    root = tmp_path / "stable-diffusion-webui"
    c = tiny_components
    (root / "models" / "Stable-diffusion" / "sub").mkdir(parents=True)
    save_file(pipeline_to_ldm(c.unet, c.vae, c.text_encoder), root / "models" / "Stable-diffusion" / "sub" / "mymix.safetensors")
    _lora(c, root / "models" / "Lora" / "style.safetensors")
    (root / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(1, 32) * 0.1}, root / "embeddings" / "shiny.safetensors")
    torch.manual_seed(0)
    ControlNetModel.from_unet(c.unet).save_pretrained(root / "models" / "ControlNet" / "edges")
    return root


def test_models_from_an_a1111_folder_show_in_the_pickers_and_nothing_is_written(a1111, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from sdstudio.models.refs import MODELS_FROM_ENV, Places, set_models_from
    from sdstudio.playground.recipe import ControlNetItem, EmbeddingItem, LoraItem, Recipe
    from sdstudio.playground.session import Playground
    from sdstudio.ui.context import AppContext
    from sdstudio.ui.library_tab import base_model_choices
    from sdstudio.ui.playground_tab import model_choices
    from sdstudio.workspace import Workspace

    before = _snapshot(a1111)
    monkeypatch.setenv(MODELS_FROM_ENV, "")  # recorded, so the roots set_models_from writes are undone after the test
    set_models_from([str(a1111)])
    ws = Workspace.open(tmp_path / "ws")
    ctx = AppContext(workspace=ws)
    ckpt = str(a1111 / "models/Stable-diffusion/sub/mymix.safetensors")
    assert ckpt in [v for _l, v in base_model_choices(ctx)]
    assert [v for _l, v in model_choices(ctx, "lora")] == [str(a1111 / "models/Lora/style.safetensors")]
    assert [v for _l, v in model_choices(ctx, "embedding")] == [str(a1111 / "embeddings/shiny.safetensors")]
    assert [v for _l, v in model_choices(ctx, "controlnet")] == [str(a1111 / "models/ControlNet/edges")]
    assert all("read-only" in label for label, _v in model_choices(ctx, "lora"))
    assert {m.source for m in scan_models(ws)} == {str(a1111)}

    places = Places.app(ws)
    assert str(places.model("mymix").path) == ckpt  # by name, as A1111 users call their checkpoints
    edges = ws.root / "inputs" / "edges.png"
    Image.fromarray(((np.random.default_rng(0).random((64, 64)) > 0.8) * 255).astype(np.uint8)).convert("RGB").save(edges)
    recipe = Recipe(base_model="mymix", prompt="a <shiny> cat", steps=2, width=64, height=64,
                    lora=[LoraItem(str(a1111 / "models/Lora/style.safetensors"), 0.8)],
                    embedding=[EmbeddingItem(str(a1111 / "embeddings/shiny.safetensors"), "<shiny>")],
                    controlnet=[ControlNetItem(str(a1111 / "models/ControlNet/edges"), image="inputs/edges.png")])
    images = Playground(places=places, device="cpu").run(recipe)
    assert len(images) == 1 and images[0].size == (64, 64)
    with pytest.raises(UserError, match="outside the workspace"):
        places.output(str(a1111 / "models" / "Lora" / "new.safetensors"))
    assert _snapshot(a1111) == before  # read, never written


def test_comfyui_layout_and_a_models_folder_given_directly(tmp_path, tiny_components, monkeypatch):
    from sdstudio.models.refs import MODELS_FROM_ENV, set_models_from
    from sdstudio.workspace import Workspace

    comfy = tmp_path / "ComfyUI"
    _lora(tiny_components, comfy / "models" / "loras" / "a.safetensors")
    _sdxl_lora(comfy / "models" / "loras" / "xl" / "b.safetensors")
    (comfy / "models" / "embeddings").mkdir(parents=True)
    save_file({"emb_params": torch.zeros(1, 32)}, comfy / "models" / "embeddings" / "e.safetensors")
    monkeypatch.setenv(MODELS_FROM_ENV, "")  # recorded, so the roots set_models_from writes are undone after the test
    ws = Workspace.open(tmp_path / "ws")
    for given in (comfy, comfy / "models"):
        set_models_from([str(given)])
        found = {(Path(m.path).name, m.kind, m.family) for m in scan_models(ws)}
        assert found == {("a.safetensors", "lora", "sd1"), ("b.safetensors", "lora", "sdxl"),
                         ("e.safetensors", "embedding", "sd1")}, given
    with pytest.raises(UserError, match="no such folder"):
        set_models_from([str(tmp_path / "nope")])
