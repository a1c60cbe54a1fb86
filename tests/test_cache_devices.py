"""The shared base-model cache and the device/dtype choice."""
from __future__ import annotations

import pytest
import torch

from sdstudio.devices import memory, pick_device, pick_dtype
from sdstudio.errors import UserError
from sdstudio.models.cache import ModelCache


def test_cache_loads_once_and_take_hands_over(tiny_dir):
    cache = ModelCache()
    a = cache.get("tiny")
    b = cache.get("tiny")
    assert a is b and cache.loads == 1
    taken = cache.take("tiny")
    assert taken is a and cache.loaded_ref is None
    c = cache.get("tiny")
    assert c is not a and cache.loads == 2  # training mutated its copy; the Playground gets a clean one


def test_cpu_choice():
    if not torch.cuda.is_available():
        assert pick_device("auto") in ("cpu", "mps")
        with pytest.raises(UserError, match="CUDA"):
            pick_device("cuda")
    assert pick_dtype("cpu", "auto") == torch.float32
    assert pick_dtype("cpu", "bf16") == torch.bfloat16
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        pick_dtype("cpu", "fp16")
    with pytest.raises(UserError):
        pick_dtype("cpu", "fp8")
    assert memory("cpu").used_gb > 0


@pytest.mark.gpu
def test_cuda_dtype_choice():
    assert pick_device("auto") == "cuda"
    assert pick_dtype("cuda", "auto") in (torch.bfloat16, torch.float16)
    assert memory("cuda").total_gb > 1
