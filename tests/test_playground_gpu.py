"""The Playground on a CUDA GPU in half precision: LoRA stack fused and unfused, ControlNet + T2I-Adapter,
and a weight change that reads no file. Run with `pytest -m gpu` on a machine with a GPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stack_and_controls_on_cuda_in_half_precision(tmp_path, tiny_components, dtype):
    from diffusers import ControlNetModel, T2IAdapter
    from PIL import Image
    from safetensors.torch import save_file

    from sdstudio.playground import files as files_mod
    from sdstudio.playground.recipe import ControlNetItem, LoraItem, Recipe, T2IAdapterItem
    from sdstudio.playground.session import Playground
    from test_playground_stack import kohya_lora

    save_file(kohya_lora(tiny_components, 1, scale=0.1), tmp_path / "a.safetensors")
    save_file(kohya_lora(tiny_components, 2, rank=8, alpha=1.0, scale=0.1), tmp_path / "b.safetensors")
    ControlNetModel.from_unet(tiny_components.unet).save_pretrained(tmp_path / "cn")
    T2IAdapter(in_channels=3, channels=[32, 32, 64, 64], num_res_blocks=2, downscale_factor=8,
               adapter_type="full_adapter").save_pretrained(tmp_path / "t2i")
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "c.png")
    pg = Playground(device="cuda", dtype=dtype)
    r = Recipe(prompt="a (dog:1.2)", steps=4, width=64, height=64, sampler="dpm++2m_karras", seed=3,
               lora=[LoraItem(str(tmp_path / "a.safetensors"), 0.8), LoraItem(str(tmp_path / "b.safetensors"), 0.5)],
               controlnet=[ControlNetItem(str(tmp_path / "cn"), image=str(tmp_path / "c.png"))],
               t2i_adapter=[T2IAdapterItem(str(tmp_path / "t2i"), image=str(tmp_path / "c.png"), weight=0.5)])
    unfused = np.asarray(pg.run(r)[0]).astype(np.int16)
    fused = np.asarray(pg.run(r, fuse=True)[0]).astype(np.int16)
    assert pg.comps.unet.dtype == dtype and pg.stack.fused
    assert np.abs(unfused - fused).mean() < 8  # half-precision rounding differs between the two paths
    reads = files_mod.FILE_READS["count"]
    pg.stack.apply(r.replace(lora=[LoraItem(r.lora[0].path, 0.3), LoraItem(r.lora[1].path, 0.5)]))
    assert files_mod.FILE_READS["count"] == reads
    base = np.asarray(pg.run(Recipe(prompt="a (dog:1.2)", steps=4, width=64, height=64, sampler="dpm++2m_karras",
                                    seed=3))[0])
    assert base.shape == (64, 64, 3)
