"""A VAE file in the Playground (A1111's "SD VAE", per recipe here): the three layouts users have (A1111/LDM names,
the same under `first_stage_model.`, diffusers names) read to the same VAE; a recipe's `vae` decodes with it, is
read once per file version, and leaving it empty puts the base's own back; files that are not a VAE for this base
are one sentence. On the tiny model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdstudio.errors import UserError
from sdstudio.formats.ldm import vae_to_ldm
from sdstudio.formats.vae import read_vae
from sdstudio.playground.recipe import Recipe
from sdstudio.playground.session import Playground

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BASE = Recipe(prompt="a house by a lake", steps=3, width=64, height=64, sampler="euler", cfg=5.0, seed=3)


def _save(sd: dict, path) -> str:
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def vae_files(tmp_path_factory, tiny_components):
    """The tiny base's VAE with a retuned decoder (its output convolution's bias moved, as a fine-tuned VAE's
    colours differ), in the three layouts."""
    d = tmp_path_factory.mktemp("vae")
    sd = {k: v.clone() for k, v in tiny_components.vae.state_dict().items()}
    sd["decoder.conv_out.bias"] += torch.tensor([0.4, -0.3, 0.2])
    ldm = vae_to_ldm(sd, tiny_components.vae.config)
    return {"diffusers": _save(sd, d / "tuned-diffusers.safetensors"), "ldm": _save(ldm, d / "tuned-ldm.safetensors"),
            "checkpoint": _save({f"first_stage_model.{k}": v for k, v in ldm.items()} |
                                {"model.diffusion_model.out.0.weight": torch.ones(4)}, d / "tuned-ckpt.safetensors"),
            "tuned": sd, "dir": d}


def test_three_layouts_read_to_the_same_vae(vae_files, tiny_components):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    want = tiny_components.vae.decode(z).sample
    outs = [read_vae(vae_files[k], tiny_components.vae).decode(z).sample for k in ("diffusers", "ldm", "checkpoint")]
    assert all(torch.equal(o, outs[0]) for o in outs)
    # The retuned bias shifts the decoded colours by exactly its change; everything else is the base's.
    shift = (outs[0] - want).mean(dim=(0, 2, 3))
    assert torch.allclose(shift, torch.tensor([0.4, -0.3, 0.2]), atol=1e-5)


def test_a_recipe_vae_decodes_is_read_once_and_empty_is_the_base_own(vae_files, tiny_dir):
    pg = Playground(device="cpu")
    plain = np.asarray(pg.run(BASE)[0]).astype(np.int16)
    own = pg.comps.vae
    tuned = np.asarray(pg.run(BASE.replace(vae=vae_files["ldm"]))[0]).astype(np.int16)
    # The bias is in [-1, 1] units; an 8-bit channel moves by about 255/2 times it (less where it clips).
    moved = (tuned - plain).reshape(-1, 3).mean(0)
    assert moved[0] > 20 and moved[1] < -15 and moved[2] > 10, moved
    again = np.asarray(pg.run(BASE.replace(vae=vae_files["ldm"], seed=4))[0])
    assert pg.vae_reads == 1 and again.shape == tuned.shape  # a second generation reads nothing
    back = np.asarray(pg.run(BASE)[0]).astype(np.int16)
    assert np.array_equal(back, plain) and pg.comps.vae is own


def test_files_that_are_not_a_vae_for_this_base_are_one_sentence(vae_files, tiny_components, tmp_path):
    d = vae_files["dir"]
    lora = _save({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, d / "a-lora.safetensors")
    with pytest.raises(UserError, match="is not a VAE .*no decoder weights"):
        read_vae(lora, tiny_components.vae)
    wide = {k: torch.cat([v, v]) if k == "decoder.conv_in.weight" else v for k, v in vae_files["tuned"].items()}
    with pytest.raises(UserError, match="does not fit this base model's VAE"):
        read_vae(_save(wide, d / "other.safetensors"), tiny_components.vae)
    broken = dict(vae_files["tuned"], **{"decoder.conv_out.bias": torch.tensor([float("nan"), 0.0, 0.0])})
    with pytest.raises(UserError, match="tuned-nan"):
        read_vae(_save(broken, d / "tuned-nan.safetensors"), tiny_components.vae)
    pickled = tmp_path / "vae.pt"
    torch.save(vae_files["tuned"], pickled)
    with pytest.raises(UserError, match="pickle"):
        read_vae(pickled, tiny_components.vae)
    pg = Playground(device="cpu")
    with pytest.raises(UserError, match="The VAE missing.safetensors does not exist"):
        pg.run(BASE.replace(vae=str(d / "missing.safetensors")))
    # A failed read leaves the base's own VAE decoding.
    with pytest.raises(UserError):
        pg.run(BASE.replace(vae=lora))
    assert pg.comps.vae is pg.comps.extra["own_vae"]


def test_the_playground_form_lists_models_vae_and_keeps_the_choice(vae_files, workspace):
    import shutil

    from sdstudio.ui.context import AppContext
    from sdstudio.ui.playground_tab import FORM_FIELDS, OWN_VAE, vae_choices

    target = workspace.models("vae")
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(vae_files["ldm"], target / "tuned.safetensors")
    ctx = AppContext(workspace=workspace)
    labels, values = zip(*vae_choices(ctx))
    assert labels[0] == OWN_VAE and values[0] == ""
    assert any(v.endswith("tuned.safetensors") for v in values[1:])
    assert "vae" in FORM_FIELDS  # saved with the form, restored on reload, written into each PNG's recipe
    r = Recipe.from_dict({"vae": "models/vae/tuned.safetensors", "prompt": "x"})
    assert Recipe.from_toml(r.to_toml()).vae == "models/vae/tuned.safetensors"
